"""The base classes of every spec model: unknown fields are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(Strict):
    """Base of every method's config; `name` picks the method (spec/method_configs.py)."""

    name: str
