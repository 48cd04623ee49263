"""What every part of the configuration schema shares: the strict base model and the one error type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem; the message names the key (``cameras[1].fps``) and the reason."""


class Strict(BaseModel):
    """A config section: unknown keys are errors (a misspelt key must not be ignored), values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
