"""
twistd plugin for cosedge: ``twistd -n --pidfile= cosedge --config cosedge.toml``.

This file is inert on purpose: it only names ``cosedge.tap``, which twistd
imports lazily when the sub-command is used.
"""

from twisted.application.service import ServiceMaker

cosedge = ServiceMaker(
    "cosedge",
    "cosedge.tap",
    "Serve object-storage buckets from local disk with back-to-origin (302 + background fill).",
    "cosedge",
)
