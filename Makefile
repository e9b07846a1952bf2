# medfound: `make demo` runs the whole pipeline on the bundled sample data; `make test` runs the tests.
# Both create (or update) the virtual environment in .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medfound-installed
MF     := $(BIN)/medfound
DEMO   := runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	rm -rf $(DEMO)
	@echo "== 1/6 shard the bundled sample archive (data/README.md) =="
	$(MF) shard npz data/medmnist/retinamnist_demo.npz --out $(DEMO)/shards/retinamnist --name retinamnist \
	  --modality fundus --label-type ordinal --label-names "no DR,mild,moderate,severe,proliferative" \
	  --max-count 256 --license CC-BY-4.0 \
	  --attribution "RetinaMNIST, MedMNIST v2 (Yang et al., Scientific Data 2023); images from DeepDRiD"
	$(MF) shard npz data/medmnist/pneumoniamnist_demo.npz --out $(DEMO)/shards/pneumoniamnist --name pneumoniamnist \
	  --modality cxr --label-names normal,pneumonia --max-count 256 --license CC-BY-4.0 \
	  --attribution "PneumoniaMNIST, MedMNIST v2 (Yang et al., Scientific Data 2023); images from Kermany et al., Cell 2018"
	$(MF) shard wsi data/wsi/CMU-1-Small-Region.svs --out $(DEMO)/shards/he_cmu1 --name he_cmu1 --modality pathology \
	  --mpp 1.0 --tile-size 64 --min-tissue 0.5 --keep-names --max-count 256 --license CC0-1.0 \
	  --attribution "CMU-1-Small-Region.svs, OpenSlide test data (Carnegie Mellon University), CC0"
	@echo "== 2/6 inspect: verify every shard against its manifest =="
	$(MF) inspect $(DEMO)/shards/retinamnist $(DEMO)/shards/pneumoniamnist $(DEMO)/shards/he_cmu1
	@echo "== 3/6 MAE pretraining of a tiny ViT on all three modalities =="
	$(MF) pretrain pretrain/demo_mae_tiny.yaml
	@echo "== 4/6 LoRA fine-tuning on RetinaMNIST diabetic-retinopathy grades =="
	$(MF) finetune adapt/demo_classify_lora.yaml
	@echo "== 5/6 evaluate on the official RetinaMNIST test split =="
	$(MF) evaluate $(DEMO)/finetune
	@echo "== 6/6 publish timm-loadable folders with their model cards (backbone and classifier), check the cards =="
	$(MF) publish $(DEMO)/pretrain --out $(DEMO)/backbone --name medfound-demo-vit-tiny-mae --overwrite
	$(MF) publish $(DEMO)/finetune --out $(DEMO)/model --name medfound-demo-vit-tiny-retinamnist --overwrite --dry-run
	$(MF) card check $(DEMO)/model
	@echo
	@echo "Demo outputs:"
	@echo "  shards + manifests    $(DEMO)/shards/{retinamnist,pneumoniamnist,he_cmu1}/manifest.json"
	@echo "  pretraining run       $(DEMO)/pretrain  (config.yaml, logs/metrics.jsonl, logs/tensorboard, checkpoints/, export/)"
	@echo "  fine-tuning run       $(DEMO)/finetune  (same layout, plus eval.json and export/adapter/)"
	@echo "  evaluation            $(DEMO)/finetune/eval.json, predictions.csv, report/report.md (+ PNG plots)"
	@echo "  published backbone    $(DEMO)/backbone  (model.safetensors, config.json, preprocessing.json, README.md card)"
	@echo "  published model       $(DEMO)/model     (the same + eval.json, adapter/, report/; card checked)"
	@echo "  load it:  $(BIN)/python -c \"import timm; print(timm.create_model('local-dir:$(DEMO)/model', pretrained=True))\""

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/mae_encoder_speed.py

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check medfound tests benchmarks

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
