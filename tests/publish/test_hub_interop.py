"""Hugging Face interop of a published classifier: timm, transformers' TimmWrapper and its image-classification
pipeline load the folder with identical outputs and class names; peft's PeftModel on the documented base reproduces
the merged model; the card's metadata parses with huggingface_hub's own ModelCardData / model-index parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image

from medfound.workflows import publish_run

transformers = pytest.importorskip("transformers", reason="transformers (installed with peft) is needed")

NAMES = ["no DR", "mild", "moderate", "severe", "proliferative"]


@pytest.fixture(scope="module")
def hub_published(finetuned, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hubpub") / "model"
    publish_run(finetuned, out, name="tiny-demo", base_model="medfound/demo-vit-tiny-mae")
    return out


def test_timm_transformers_and_the_pipeline_agree(hub_published):
    from transformers import TimmWrapperForImageClassification, pipeline

    folder = str(hub_published)
    cfg = json.loads((hub_published / "config.json").read_text())
    assert "num_classes" not in cfg["model_args"] and cfg["num_classes"] == 5  # the TypeError's cause, removed
    ref = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    wrapped = TimmWrapperForImageClassification.from_pretrained(folder).eval()
    assert [wrapped.config.id2label[i] for i in range(5)] == NAMES == ref.pretrained_cfg["label_names"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(wrapped(pixel_values=x).logits, ref(x), atol=1e-6)

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=ref))
    with torch.no_grad():
        probs = ref(transform(image)[None]).softmax(-1)[0]
    got = pipeline("image-classification", model=folder, top_k=5)(image)
    assert {r["label"] for r in got} == set(NAMES)
    for r in got:
        assert r["score"] == pytest.approx(float(probs[NAMES.index(r["label"])]), abs=1e-5), r


def test_the_lora_adapter_loads_on_its_documented_base(finetuned, hub_published, pretrained):
    from peft import PeftModel

    adapter = hub_published / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "medfound/demo-vit-tiny-mae"
    base = json.loads((adapter / "base_model.json").read_text())
    assert base["timm_name"] == "hf-hub:medfound/demo-vit-tiny-mae"
    assert base["timm_kwargs"] == {"num_classes": 5, "global_pool": "avg", "fc_norm": False}
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: medfound/demo-vit-tiny-mae" in card
    assert "fc_norm=False" in card and "Output: 5 logits" in card

    # the run's own export names the local backbone folder it started from, which is what the Hub id holds
    run_base = json.loads((finetuned / "export" / "adapter" / "base_model.json").read_text())
    assert Path(run_base["timm_name"].removeprefix("local-dir:")) == pretrained / "export"
    from medfound.io import sha256_file

    assert run_base["base_weights_sha256"] == sha256_file(pretrained / "export" / "model.safetensors")
    snippet = card.split("```python", 1)[1].split("```", 1)[0]
    snippet = snippet.replace("hf-hub:medfound/demo-vit-tiny-mae", f"local-dir:{pretrained / 'export'}")
    scope: dict = {}
    exec(snippet.replace("PATH_TO_THIS_FOLDER", str(hub_published)), scope)
    merged = timm.create_model(f"local-dir:{hub_published}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((scope["model"](x) - merged(x)).abs().max()) < 1e-5
        # and the obvious rebuild is a different network (timm's avg pooling turns on fc_norm)
        naive = PeftModel.from_pretrained(
            timm.create_model(f"local-dir:{pretrained / 'export'}", pretrained=True, num_classes=5,
                              global_pool="avg"), str(adapter)).eval()
        assert float((naive(x) - merged(x)).abs().max()) > 1e-3


def test_card_metadata_parses_with_huggingface_hub(hub_published, finetuned):
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(hub_published / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "medfound/demo-vit-tiny-mae"
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "tiny-demo" and results
    evaluation = json.loads((finetuned / "eval.json").read_text())
    assert {r.metric_name: r.metric_value for r in results if r.dataset_split == "test"} == {
        k: round(v, 4) for k, v in evaluation["metrics"].items()}
    again = ModelCardData(**{k: v for k, v in data.items() if k != "model-index"}, eval_results=results,
                          model_name=name)
    assert again.to_dict()["model-index"] == data["model-index"]

    text = card.text
    # the tests' tiny model (patch 8, depth 2, width 64), not only timm's family name vit_tiny_patch16_224
    assert "`vit_tiny_patch16_224` (timm family) built with patch 8, depth 2, width 64, 2 heads" in text
    assert "`forward_features(x)`: [B, 17, 64]; pooled features (`num_classes=0`): [B, 64]; " \
           "`model(x)`: logits [B, 5]" in text
    assert "[B, 3, 32, 32]" in text and "medfound/demo-vit-tiny-mae" in text
    bib = text.split("```bibtex", 1)[1].split("```", 1)[0]
    assert bib.count("@") == 3 and "@misc{tiny_demo," in bib  # the model, MAE and LoRA
    assert "he2022mae" in bib and "hu2022lora" in bib
    assert 'timm.create_model("hf-hub:REPO_ID", pretrained=True)' in text


def test_publish_with_push_writes_the_repo_id_into_the_hf_hub_snippet(finetuned, tmp_path):
    out = tmp_path / "model"
    publish_run(finetuned, out, name="tiny-demo", push="org/tiny", dry_run=True)
    text = (out / "README.md").read_text()
    assert 'timm.create_model("hf-hub:org/tiny", pretrained=True)' in text
    assert "\\url{https://huggingface.co/org/tiny}" in text
    assert "REPO_ID" not in text
