"""
``twistd cosedge``: command-line options and the service maker.

``makeService`` imports the reactor inside the function and hands it to the
pure :func:`cosedge.service.build_service`, which tests call with a
``MemoryReactorClock``.
"""

from __future__ import annotations

from attrs import evolve
from twisted.application.service import IService
from twisted.python import usage

from .config import ConfigError, load_config

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[--config PATH] [--listen ENDPOINT ...]"
    longdesc = (
        "Serve COS-style buckets from local disk.  A request for a missing object "
        "is redirected (302) to the bucket's origin and the object is copied into "
        "the bucket in the background.  Without --config the embedded example "
        "configuration is used."
    )
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file (default: the embedded example)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """A Twisted endpoint string for the bucket listener (repeatable; overrides [server] listen)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        try:
            config = load_config(self["config"])
            if self["listen"]:
                config = evolve(config, server=evolve(config.server, listen=tuple(self["listen"])))
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None
        self["parsed"] = config


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from .service import build_service

    return build_service(options["parsed"], reactor, config_path=options["config"])
