"""
Deferreds that have often fired already.

A store on local disk answers with Deferreds that have already fired; code
that serves from it should then go on at once, in the same call, and wait
only when the Deferred is still pending (a network store).
"""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["settled"]

_T = TypeVar("_T")


def _keep(result: object, box: list[object]) -> object:
    box.append(result)
    return result


def _consume(failure: Failure) -> None:
    return None


def settled(d: Deferred[_T]) -> _T | Deferred[_T]:
    """
    ``d``'s result if it has fired (its failure raised), else ``d`` itself,
    to wait on.
    """
    box: list[object] = []
    d.addBoth(_keep, box)
    if not box:
        return d
    result = box[0]
    if isinstance(result, Failure):
        d.addErrback(_consume)  # handled here: raised below
        result.raiseException()
    return result  # type: ignore[return-value]
