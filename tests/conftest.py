"""
Shared fixtures.  Every test fails if cosedge logged an unexpected failure
(``_log.failure`` or a critical event), so an error swallowed into the log —
an unhandled failed Deferred, say — cannot pass silently.  A test that
expects such events takes the ``logged_failures`` fixture and inspects and
clears the list itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogLevel, globalLogPublisher

from .helpers import StepCooperator


@pytest.fixture(autouse=True)
def logged_failures() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("log_level") == LogLevel.critical:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)
    if events:
        from twisted.logger import formatEvent

        details = "\n".join(
            formatEvent(e) + ("\n" + e["log_failure"].getTraceback() if "log_failure" in e else "") for e in events
        )
        pytest.fail(f"unexpected failures were logged:\n{details}")


@pytest.fixture
def cooperator(monkeypatch: pytest.MonkeyPatch) -> StepCooperator:
    """A step-by-step cooperator in place of Twisted's global one (for producers)."""
    coop = StepCooperator()
    coop.install(monkeypatch)
    return coop
