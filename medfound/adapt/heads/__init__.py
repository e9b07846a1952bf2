"""Task heads. Each reads its geometry from the backbone it is attached to."""

from medfound.adapt.heads.classify import attach_classifier

__all__ = ["attach_classifier"]
