"""
Deferreds that have often fired already.

A store on local disk answers with Deferreds that have already fired; code
that serves from it should then go on at once, in the same call, and wait
only when the Deferred is still pending (a network store).
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["PENDING", "now", "settled"]

_T = TypeVar("_T")


#: What :func:`now` says of a Deferred that has no value yet (or failed).
PENDING: Any = object()


def now(d: Deferred[Any]) -> Any:
    """
    ``d``'s value if it has fired with one, else :data:`PENDING` (not fired,
    waiting on another Deferred, or failed: take those with callbacks).
    Reads the Deferred's ``called``, ``paused`` and ``result``, public but
    undocumented attributes (see the README's developer notes), because
    adding a callback to a fired Deferred runs Twisted's whole callback loop:
    1.3 us, twice on every hit.
    """
    if d.called and not d.paused:
        result = d.result
        if not isinstance(result, Failure):
            return result
    return PENDING


def settled(d: Deferred[_T]) -> _T | Deferred[_T]:
    """
    ``d``'s result if it has fired (its failure raised), else a Deferred of
    it, to wait on.  The idiom inlined on the hit path: a list's ``append``
    as the callback costs less than any function of ours.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        # append took the result (a failure included) and passed on None.
        return d.addCallback(lambda _: box[0])
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]
