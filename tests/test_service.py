"""
The service tree, the twistd options and the plugin: built on a
``MemoryReactorClock``, never the global reactor.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import twisted.internet
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.application.service import IService, IServiceMaker
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from cosedge import tap
from cosedge.config import BucketConfig, Config, ServerConfig, load_config
from cosedge.service import EdgeService, build_service
from cosedge.storage.disk import SMALL_BODY, DiskStore
from cosedge.testing import FakeOrigin, MemoryStore

from .helpers import BUCKET, HOST, StepCooperator, result_of, source_for

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, *listen: str) -> Config:
    return Config(
        server=ServerConfig(
            listen=listen or ("tcp:18080:interface=127.0.0.1",),
            data_dir=str(tmp_path / "data"),
            access_log="",
        ),
        buckets={BUCKET: BucketConfig(origin="10.10.10.10:8080", origin_pull=True)},
    )


def _build(config: Config, **kwargs: Any) -> tuple[EdgeService, MemoryReactorClock, FakeOrigin]:
    reactor = MemoryReactorClock()
    origin = FakeOrigin()
    kwargs.setdefault("_agent", RequestTraversalAgent(origin))
    return build_service(config, reactor, **kwargs), reactor, origin


# -- the plugin ------------------------------------------------------------------------------


def test_plugin_names_cosedge_tap() -> None:
    """The twistd plugin imports cleanly and names the cosedge.tap module lazily."""
    from twisted.plugins import cosedge_plugin

    maker = cosedge_plugin.cosedge
    assert IServiceMaker.providedBy(maker) and IPlugin.providedBy(maker)
    assert maker.tapname == "cosedge"
    assert maker.module == "cosedge.tap"
    assert maker.options is tap.Options
    assert maker.description


def test_plugin_file_is_inert() -> None:
    """Importing the plugin installs no reactor and loads none of cosedge; twisted/ has no __init__.py."""
    code = (
        "import sys; import twisted.plugins.cosedge_plugin; "
        "print('twisted.internet.reactor' in sys.modules, any(m.startswith('cosedge') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()


def test_plugin_is_discovered() -> None:
    """twistd's plugin discovery finds 'cosedge' (otherwise: 'Unknown command: cosedge')."""
    from twisted.plugin import getPlugins

    names = {p.tapname for p in getPlugins(IServiceMaker)}
    assert "cosedge" in names


# -- options ---------------------------------------------------------------------------------


def test_options_default_config() -> None:
    """Without --config the embedded example configuration is used."""
    options = tap.Options()
    options.parseOptions([])
    assert options["parsed"] == load_config(None)
    assert options["config"] is None


def test_options_load_the_file(tmp_path: Path) -> None:
    """--config loads the named TOML file."""
    path = tmp_path / "c.toml"
    path.write_text('[server]\ndomains = ["cdn.example.com"]\n')
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert options["parsed"].server.domains == ("cdn.example.com",)
    assert options["config"] == str(path)


def test_listen_is_repeatable_and_overrides_the_file(tmp_path: Path) -> None:
    """Each --listen (or -l) adds an endpoint; together they replace [server] listen."""
    path = tmp_path / "c.toml"
    path.write_text('[server]\nlisten = ["tcp:9999"]\n')
    options = tap.Options()
    options.parseOptions(
        ["--config", str(path), "--listen", "tcp:8081:interface=127.0.0.1", "-l", "tcp:8082:interface=127.0.0.1"]
    )
    assert options["parsed"].server.listen == ("tcp:8081:interface=127.0.0.1", "tcp:8082:interface=127.0.0.1")
    plain = tap.Options()
    plain.parseOptions(["--config", str(path)])
    assert plain["parsed"].server.listen == ("tcp:9999",)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[buckets."example-1250000000"]\norigin = "http://a.example"\n', "[buckets.example-1250000000] origin"),
        ('[buckets."example-1250000000"]\norigin_pull = true\n', "origin_pull cannot be enabled"),
        ("[server]\ndomains = []\n", "[server] domains"),
        ("[fill]\nmax_concurrent = 0\n", "[fill] max_concurrent"),
        ("[nonsense]\n", "unknown section"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_config_is_a_usage_error_naming_the_field(tmp_path: Path, text: str, fragment: str) -> None:
    """A bad configuration file stops twistd with one clear message naming the file and the field."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(usage.UsageError) as info:
        tap.Options().parseOptions(["--config", str(path)])
    message = str(info.value)
    assert message.startswith("configuration error: ")
    assert str(path) in message
    assert fragment in message


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    """A config path that does not exist is a usage error, not a traceback."""
    with pytest.raises(usage.UsageError, match="cannot read"):
        tap.Options().parseOptions(["--config", str(tmp_path / "nope.toml")])


def test_empty_listen_is_a_usage_error() -> None:
    """An empty --listen value is refused."""
    with pytest.raises(usage.UsageError, match="listen"):
        tap.Options().parseOptions(["--listen", ""])


# -- build_service ---------------------------------------------------------------------------


def test_build_service_listens_on_the_configured_endpoints(tmp_path: Path) -> None:
    """Starting the service listens on every configured endpoint, with the bucket site."""
    config = _config(tmp_path, "tcp:18080:interface=127.0.0.1", "tcp:18081:interface=127.0.0.1")
    service, reactor, _ = _build(config, config_path="/etc/cosedge.toml")
    assert IService.providedBy(service)
    assert reactor.tcpServers == []
    service.startService()
    try:
        listening = [(port, interface) for port, factory, _, interface in reactor.tcpServers if factory is service.site]
        assert listening == [(18080, "127.0.0.1"), (18081, "127.0.0.1")]
        assert service.running
        assert service.config == config
        assert service.config_path == "/etc/cosedge.toml"
        assert isinstance(service.store, DiskStore)
        assert service.store.data_dir == config.server.data_dir
    finally:
        result_of(service.stopService())


def test_start_sweeps_leftover_temporary_files(tmp_path: Path) -> None:
    """Temporary files left by a crash are removed at start-up; objects are untouched (F13)."""
    config = _config(tmp_path)
    data = Path(config.server.data_dir)
    tmp = data / ".cosedge" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / f"{BUCKET}.abc.part").write_bytes(b"half an object")
    (tmp / f"{BUCKET}.def.part").write_bytes(b"")
    (data / BUCKET).mkdir()
    (data / BUCKET / "1.jpg").write_bytes(b"whole")
    service, _, _ = _build(config)
    service.startService()
    try:
        assert list(tmp.iterdir()) == []
        assert (data / BUCKET / "1.jpg").read_bytes() == b"whole"
    finally:
        result_of(service.stopService())


def test_memory_store_is_used_when_given(tmp_path: Path) -> None:
    """build_service takes an injected store (tests) instead of the disk store."""
    store = MemoryStore()
    service, _, _ = _build(_config(tmp_path), _store=store)
    assert service.store is store
    assert not Path(tmp_path / "data").exists()


def test_replace_config(tmp_path: Path) -> None:
    """replace_config swaps the whole configuration and returns the old one; anything else is refused."""
    config = _config(tmp_path)
    service, _, _ = _build(config)
    new = config.without_bucket(BUCKET)
    assert service.replace_config(new) == config
    assert service.config is new
    with pytest.raises(TypeError):
        service.replace_config({"buckets": {}})  # type: ignore[arg-type]
    assert service.config is new


def test_seed_example_through_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The built service answers the seed example: 302, the copy lands on disk, then 200 with the same bytes."""
    cooperator = StepCooperator()
    cooperator.install(monkeypatch)
    service, _, origin = _build(_config(tmp_path))
    image = bytes(range(256)) * 100
    origin.add("1.jpg", image, content_type="image/jpeg")
    service.startService()
    try:
        client: Any = StubTreq(service.resource)
        url = "http://127.0.0.1/1.jpg"
        first = result_of(client.get(url, headers={"Host": HOST}, allow_redirects=False))
        assert first.code == 302
        assert first.headers.getRawHeaders("location") == ["http://10.10.10.10:8080/1.jpg"]
        origin_agent: Any = service.filler.agent
        origin_agent.flush()
        assert (Path(service.config.server.data_dir) / BUCKET / "1.jpg").read_bytes() == image

        def pump(d: Deferred[Any]) -> Any:
            results: list[Any] = []
            d.addBoth(results.append)
            for _ in range(1000):
                if results:
                    return results[0]
                client.flush()
                cooperator.step()
            raise AssertionError("no response")

        second = pump(client.get(url, headers={"Host": HOST}))
        body = pump(second.content())
        assert second.code == 200
        assert body == image
        assert service.stats.events["fills_stored"] == 1
    finally:
        result_of(service.stopService())


def test_stop_cancels_fills_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Stopping the service cancels a running fill and removes its temporary file (F16)."""
    service, _, origin = _build(_config(tmp_path))
    origin.add("slow", b"s" * (SMALL_BODY + 1000), mode="stall", cut=10)  # streamed to a file
    service.startService()
    d = service.filler.fill(BUCKET, ("slow",), source_for(service.config.buckets[BUCKET].origin, ("slow",)))
    origin_agent: Any = service.filler.agent
    origin_agent.flush()
    assert service.filler.running == 1
    assert isinstance(service.store, DiskStore)
    tmp = Path(service.store.tmp_dir)
    assert len(list(tmp.iterdir())) == 1
    stopped = service.stopService()
    origin_agent.flush()
    assert stopped.called
    assert result_of(d).reason == "cancelled"
    assert list(tmp.iterdir()) == []
    assert not (Path(service.config.server.data_dir) / BUCKET / "slow").exists()


# -- makeService ------------------------------------------------------------------------------


class _ThreadedMemoryReactor(MemoryReactorClock):
    """A memory reactor with a (never started) thread pool, as makeService's real path needs."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = ThreadPool()

    def getThreadPool(self) -> ThreadPool:
        return self.pool


def test_make_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """makeService builds the service from the parsed options on the reactor, with --demo-origin's listener."""
    reactor = _ThreadedMemoryReactor()
    monkeypatch.setattr(twisted.internet, "reactor", reactor, raising=False)
    with socket.socket() as probe:  # a port nothing else holds (start-up checks that no process does)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = f"tcp:{port}:interface=127.0.0.1"
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\naccess_log = ""\n')
    options = tap.Options()
    options.parseOptions(["--config", str(path), "--listen", listen, "--demo-origin"])
    service = tap.makeService(options)
    assert isinstance(service, EdgeService)
    assert service.reactor is reactor
    assert service.config_path == str(path)
    assert service.config.server.data_dir == str(tmp_path)
    assert service.config.server.listen == (listen,)
    service.startService()
    try:
        ports = sorted((port, interface) for port, _, _, interface in reactor.tcpServers)
        assert (port, "127.0.0.1") in ports
        assert (8081, "127.0.0.1") in ports
    finally:
        result_of(service.stopService())


def test_origin_endpoints_are_reused_and_follow_the_connect_timeout() -> None:
    """
    The fill agent asks for an endpoint on every request: the same origin
    gets the same endpoint until connect_timeout changes, when the next
    connection uses the new value.
    """
    from twisted.web.client import URI

    from cosedge.config import FillConfig
    from cosedge.fill.client import OriginEndpoints

    timeout = [5.0]
    endpoints = OriginEndpoints(MemoryReactorClock(), lambda: FillConfig(connect_timeout=timeout[0]))
    uri = URI.fromBytes(b"http://origin.example.com:8081/a.txt")
    first = endpoints.endpointForURI(uri)
    assert endpoints.endpointForURI(URI.fromBytes(b"http://origin.example.com:8081/b.txt")) is first
    assert endpoints.endpointForURI(URI.fromBytes(b"http://other.example.com:8081/a.txt")) is not first
    timeout[0] = 2.5
    changed = endpoints.endpointForURI(uri)
    assert changed is not first
    assert changed.endpoint._timeout == 2.5
