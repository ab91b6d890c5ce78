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

from .admin.live import check_config as check_admin_config
from .cluster import check_config as check_cluster_config
from .config import Config, ConfigError, load_config
from .ops.service import check_config as check_ops_config
from .ops.service import parse_admin
from .storage.s3_config import check_config as check_storage_config
from .workers import listen_problem

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[--config PATH] [--listen ENDPOINT ...]"
    longdesc = (
        "Serve COS-style buckets from local disk.  A request for a missing object "
        "is redirected (302) to the bucket's origin and the object is copied into "
        "the bucket in the background.  Without --config the embedded example "
        "configuration is used."
    )
    optFlags = [
        [
            "demo-origin",
            None,
            "Also run a demo origin on 127.0.0.1:8081 (the example bucket's origin) for trying cosedge.",
        ],
    ]
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
            check_admin_config(config)  # [manhole] and the saved live changes
            check_ops_config(config)  # [admin] and [log]
            check_storage_config(config)  # [storage]
            check_cluster_config(config)  # [cluster] and its secret file
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None
        # A port already in use: the same one line, not a traceback from the
        # start (the listeners bind later; this is the common mistake, caught early).
        for description in _tcp_listeners(config):
            problem = listen_problem(description)
            if problem is not None:
                raise usage.UsageError(problem)
        self["parsed"] = config


def _tcp_listeners(config: Config) -> list[str]:
    """The bucket and admin listeners' endpoint strings."""
    found = list(config.server.listen)
    admin = parse_admin(config.extra)
    if admin is not None:
        found += admin.listen
    return found


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from .service import build_service

    service = build_service(options["parsed"], reactor, config_path=options["config"])
    if options["demo-origin"]:
        from twisted.application import strports
        from twisted.web.server import Site

        from .demo import DEMO_ORIGIN_ENDPOINT, demo_resource

        strports.service(DEMO_ORIGIN_ENDPOINT, Site(demo_resource()), reactor=reactor).setServiceParent(service)
    return service
