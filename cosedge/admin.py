"""Placeholder: attach point for the optional [admin] features (being built)."""

from __future__ import annotations

from typing import Any


def attach(service: Any) -> None:
    """Add this feature's child services to service when configured."""
