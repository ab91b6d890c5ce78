"""The error every refused administrative command raises."""

from __future__ import annotations

__all__ = ["AdminError"]


class AdminError(ValueError):
    """An administrative command was refused; nothing was changed."""
