"""
The cosedge benchmark: cosedge against nginx (``try_files`` + ``proxy_store``)
and a bare Twisted ``static.File``, on loopback, in one run.

Run it with ``bash bench/run`` (see ``docs/benchmark.md``).  It is not part of
the test suite.
"""
