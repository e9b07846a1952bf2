"""The one training loop every recipe uses (loop.py), with its checkpoints, optimizer and logging."""
