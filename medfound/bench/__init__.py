"""`medfound bench`: what is a backbone worth, measured.

Every backbone given (a run's export, an imported or published timm folder, or a random-init baseline, `timm:NAME`
or `timm:same-as:FOLDER`) goes through every task of a suite (a labelled shard set with train / val / test splits and
a metric) under every protocol of it, at every label fraction and seed:
- frozen features, computed once and cached by the sha256 of backbone, data, split and preprocessing
  (features.py): k-NN, a logistic-regression probe with its regularisation chosen on validation, SimpleShot
  few-shot over many seeded supports (protocols.py);
- the fine-tuning path itself, LoRA or full, with selection on the same fraction of the validation split.
The label subsets are the fine-tuning path's own (medfound.data.fractions: stratified, by patient, nested, seeded).
Each result is the metric on the test split with a BCa interval, and each pair of backbones gets its paired
difference on the same test samples with an interval and a p-value (stats.py). Outputs (report.py): results.csv,
results.json, paired.csv, leaderboard.md and a label-efficiency plot per task.

Suites are YAML (suite.py): the shipped `quick` (the bundled demo sets, minutes on 2 CPU cores) and `medmnist`
(PneumoniaMNIST and RetinaMNIST from ../shared/data), or your own.
"""
