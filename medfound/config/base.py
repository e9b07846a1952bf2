"""The base every recipe section derives from, the error type, and the shard-location field type."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from medfound.data.location import check_location


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and the fix."""


ShardLocation = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v),
                          AfterValidator(check_location)]
"""A shard-set folder or a remote prefix (`s3://`, `gs://`, `https://`; see `medfound.data.location`)."""


class Strict(BaseModel):
    # allow_inf_nan=False: `optim.blr=inf` or `weight_decay=nan` is a typo-class error caught before any work,
    # not a run whose first update turns every weight NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
