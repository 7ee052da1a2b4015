"""Shared pieces of the manifest models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base of every manifest section: unknown fields are an error, values are immutable.

    Immutability matters because a stage's cache key is a hash of its section: a section that
    could change after hashing would make cached outputs lie about what produced them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True)


class Toggle(StrictModel):
    """A data step that can be switched off without deleting its settings."""

    enabled: bool = True
    """Run this step. Off, the step is skipped and reported as such in the data card."""
