"""Evaluation: metric definitions (metrics.py) and `eval.json` for a run (report.py)."""
