"""Exceptions with messages a user can act on: what is wrong, in which file, and how to fix it."""
from __future__ import annotations

__all__ = ["ThsrnError", "DataError", "ConfigError", "CheckpointError"]


class ThsrnError(Exception):
    """Base class of every error the library raises on purpose (the CLI prints these without a traceback)."""


class DataError(ThsrnError, ValueError):
    """A data file is missing, malformed, or inconsistent with another one."""


class ConfigError(ThsrnError, ValueError):
    """An unknown or invalid configuration value or parameter."""


class CheckpointError(ThsrnError, ValueError):
    """A checkpoint file is missing, corrupt, untrusted, or incompatible."""
