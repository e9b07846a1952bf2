"""medfound: medical-imaging foundation models on timm backbones.

The workflow is data -> pretrain -> adapt -> evaluate -> publish; each stage is a subpackage
(`medfound.data`, `medfound.pretrain`, `medfound.adapt`, `medfound.evaluate`, `medfound.publish`)
and a verb of the `medfound` command line (see `medfound --help`).
"""

__version__ = "0.1.0"


def load(folder_or_run):
    """The trained model of a run directory or a published folder, whatever its task kind: a timm module
    (pretraining: the encoder; classification: the classifier), a segmentation network `[B, C, *S]` -> logits, a
    `BoxPredictor` (`.predict(image, boxes)`) or an attention-MIL head; in eval mode. Classifiers, segmentation
    networks and MIL heads also have `.predict(inputs[, out])`: `medfound predict` from Python, returning predictions.csv's rows
    (segmentation rows carry their mask arrays when no `out` is given).

        import medfound
        model = medfound.load("runs/demo/finetune")
        rows = model.predict(["new/case_1.png", "new/case_2.png"])  # [{"input", "key", "p_CLASS"..., "predicted"}]
    """
    from medfound.predict import Predictor
    from medfound.workflows import load as load_run

    model = load_run(folder_or_run)
    if not hasattr(model, "predict"):  # a BoxPredictor has its own
        model.predict = Predictor(folder_or_run)  # `medfound predict` from Python (a plain attribute, no submodule)
    return model
