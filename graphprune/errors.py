"""Exceptions raised by graphprune; the CLI maps them to exit codes."""
from __future__ import annotations

__all__ = ["GraphpruneError", "BadInputError", "NothingToPruneError", "PassError"]


class GraphpruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class BadInputError(GraphpruneError):
    """The user's input (file, model, flags) cannot be used. CLI exit code 2."""


class NothingToPruneError(BadInputError):
    """The model has no prunable channel group for the requested target."""


class PassError(GraphpruneError):
    """A pass failed; the message names the pass and the ones that ran before it."""
