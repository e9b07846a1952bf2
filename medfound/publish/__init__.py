"""Publishing: timm-loadable exports (export.py) and model cards written from the run's record (card.py)."""
