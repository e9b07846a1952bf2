"""Data layer: ingest raw archives into WebDataset shards + manifest, and stream them back.

- `ingest/`: readers for each `medfound shard KIND` (npz, images, wsi), yielding sample dicts.
- `shards.py`: writes samples into tar shards + `manifest.json`, atomically.
- `manifest.py`: the manifest schema, digest and checksum verification.
- `pipeline.py`: webdataset loaders split by node and worker, deterministic per (seed, epoch).
- `transforms.py`: image -> tensor presets (MAE single view, light augmentation, eval).
"""
