"""medfound: medical-imaging foundation models on timm backbones.

The workflow is data -> pretrain -> adapt -> evaluate -> publish; each stage is a subpackage
(`medfound.data`, `medfound.pretrain`, `medfound.adapt`, `medfound.evaluate`, `medfound.publish`)
and a verb of the `medfound` command line (see `medfound --help`).
"""

__version__ = "0.1.0"
