"""Configuration: the seed's origin rules, bucket names, sections, files, immutability."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import attrs
import pytest

from cosedge.config import (
    BucketConfig,
    Config,
    ConfigError,
    FillConfig,
    Origin,
    ServerConfig,
    default_config_text,
    load_config,
    parse_config,
    parse_origin,
    validate_bucket_name,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("abc.example.com", "abc.example.com", 80),
        ("abc.example.com:8080", "abc.example.com", 8080),
        ("10.10.10.10", "10.10.10.10", 80),
        ("10.10.10.10:8080", "10.10.10.10", 8080),
        ("ABC.Example.COM", "abc.example.com", 80),
        ("localhost:1", "localhost", 1),
        ("xn--bcher-kva.example:65535", "xn--bcher-kva.example", 65535),
    ],
)
def test_seed_origin_forms_accepted(text: str, host: str, port: int) -> None:
    """Every origin form the seed document shows is accepted, host lowercased."""
    origin = parse_origin(text)
    assert origin == Origin(host, port)


def test_origin_round_trips_through_str() -> None:
    """An origin prints as the operator wrote it (port 80 omitted) and re-parses to itself."""
    assert str(parse_origin("abc.example.com")) == "abc.example.com"
    assert str(parse_origin("abc.example.com:8080")) == "abc.example.com:8080"
    assert parse_origin("10.10.10.10:80").netloc == b"10.10.10.10"
    for text in ("abc.example.com", "10.10.10.10:8080"):
        origin = parse_origin(text)
        assert parse_origin(str(origin)) == origin
        assert parse_origin(origin) is origin  # converters accept their own output


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("http://abc.example.com", "scheme"),
        ("https://abc.example.com", "scheme"),
        ("abc.example.com/images", "path"),
        ("abc.example.com/", "path"),
        ("abc.example.com?x=1", "query"),
        ("abc.example.com#top", "fragment"),
        ("user@abc.example.com", "user-info"),
        ("user:pw@abc.example.com", "user-info"),
        ("abc.example.com ", "whitespace"),
        (" abc.example.com", "whitespace"),
        ("abc .example.com", "whitespace"),
        ("abc.example.com\t", "whitespace"),
        ("", "empty"),
        ("abc.example.com:", "invalid port"),
        ("abc.example.com:http", "invalid port"),
        ("abc.example.com:-1", "invalid port"),
        ("abc.example.com:+80", "invalid port"),
        ("abc.example.com:0", "outside 1-65535"),
        ("abc.example.com:65536", "outside 1-65535"),
        ("abc.example.com:99999", "outside 1-65535"),
        ("abc.example.com:123456", "invalid port"),
        ("abc.example.com:80:80", "'abc.example.com:80:80'"),
        ("10.10.10.10:\u0668\u0660", "invalid port"),  # Arabic-Indic digits
        ("999.1.1.1", "not a valid IPv4"),
        ("10.10.10", "not a valid IPv4"),
        ("1.2.3.4.5", "not a valid IPv4"),
        ("[::1]", "IPv6"),
        ("[2001:db8::1]:8080", "IPv6"),
        ("::1", "IPv6"),
        ("2001:db8::1", "IPv6"),
        ("-abc.example.com", "not a valid domain"),
        ("abc..example.com", "not a valid domain"),
        ("abc_def.example.com", "not a valid domain"),
        ("bücher.example", "punycode"),
    ],
)
def test_bad_origins_rejected_with_the_problem_named(text: str, problem: str) -> None:
    """Anything but host-or-IPv4[:port] is refused, and the message says what is wrong."""
    with pytest.raises(ConfigError) as info:
        parse_origin(text)
    assert problem in str(info.value)


@pytest.mark.parametrize("value", [None, 8080, ["abc.example.com"], b"abc.example.com"])
def test_origin_must_be_a_string(value: object) -> None:
    """A non-string origin value (a TOML number or array) is refused."""
    with pytest.raises(ConfigError, match="must be a string"):
        parse_origin(value)


def test_origin_pull_without_origin_refused() -> None:
    """As the seed says, origin-pull cannot be enabled without an origin address."""
    with pytest.raises(ConfigError, match="origin_pull cannot be enabled without an origin"):
        BucketConfig(origin_pull=True)
    with pytest.raises(ConfigError, match="origin_pull"):
        BucketConfig(origin="", origin_pull=True)
    with pytest.raises(ConfigError, match=r"\[buckets.example-1250000000\] origin_pull"):
        parse_config({"buckets": {"example-1250000000": {"origin_pull": True}}})


def test_origin_without_origin_pull_is_allowed() -> None:
    """An origin may be saved while origin-pull is off, and no origin at all is fine too."""
    assert BucketConfig(origin="abc.example.com").origin == Origin("abc.example.com")
    assert BucketConfig().origin is None
    assert BucketConfig(origin="").origin is None


def test_bad_origin_in_bucket_names_the_field() -> None:
    """A bad origin in a bucket section names the section and the origin field."""
    with pytest.raises(ConfigError) as info:
        parse_config({"buckets": {"example-1250000000": {"origin": "http://abc.example.com"}}})
    message = str(info.value)
    assert "[buckets.example-1250000000]" in message
    assert "origin" in message and "scheme" in message


@pytest.mark.parametrize("name", ["example-1250000000", "a-1", "my-site-2-1250000000", "0abc-9"])
def test_good_bucket_names(name: str) -> None:
    """COS bucket names <name>-<appid> in lowercase letters, digits and '-' are accepted."""
    assert validate_bucket_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "example",
        "Example-1250000000",
        "example-",
        "-1250000000",
        "example_1250000000",
        "example.1250000000",
        "example-125000000x",
        "../etc-1",
        ".cosedge-1",
        "a" * 60 + "-1",
        "",
        "example -1250000000",
        "example-1250000000\n",
        123,
    ],
)
def test_bad_bucket_names(name: object) -> None:
    """Bucket names that are not COS-style (or could escape data_dir) are refused."""
    with pytest.raises(ConfigError, match="bucket name .* is invalid"):
        validate_bucket_name(name)


def test_domains_with_trailing_newline_refused() -> None:
    """A domain with a trailing newline (a quoted TOML string) is not silently accepted."""
    with pytest.raises(ConfigError, match="domains"):
        ServerConfig(domains=("file.myqcloud.com\n",))


def test_bad_bucket_name_in_file_names_the_section() -> None:
    """A bad bucket name in the TOML names the offending section."""
    with pytest.raises(ConfigError, match=r"\[buckets.Example\] bucket name 'Example' is invalid"):
        parse_config({"buckets": {"Example": {}}})


def test_unknown_section_refused() -> None:
    """A misspelt section is an error, not silently ignored."""
    with pytest.raises(ConfigError, match="unknown section.*servr"):
        parse_config({"servr": {}})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"server": {"listn": []}}, "[server] has unknown setting(s) listn"),
        ({"fill": {"max_concurent": 3}}, "[fill] has unknown setting(s) max_concurent"),
        ({"buckets": {"example-1": {"origin_pul": True}}}, "[buckets.example-1] has unknown setting(s) origin_pul"),
    ],
)
def test_unknown_setting_refused(data: dict[str, object], fragment: str) -> None:
    """A misspelt setting is refused, naming the section, the setting and the known ones."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert fragment in str(info.value)
    assert "known:" in str(info.value)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"server": {"domains": "file.myqcloud.com"}}, "[server] domains must be a list"),
        ({"server": {"domains": []}}, "[server] domains must name at least one domain"),
        ({"server": {"domains": ["bad domain"]}}, "[server] domains: 'bad domain'"),
        ({"server": {"listen": "tcp:8080"}}, "[server] listen must be a list"),
        ({"server": {"listen": [""]}}, "[server] listen entries must be non-empty"),
        ({"server": {"data_dir": ""}}, "[server] data_dir must be a non-empty path"),
        ({"server": {"access_log": 1}}, "[server] access_log"),
        ({"server": {"request_timeout": 0}}, "[server] request_timeout must be a positive number"),
        ({"fill": {"max_concurrent": 0}}, "[fill] max_concurrent must be a positive number"),
        ({"fill": {"idle_timeout": -1}}, "[fill] idle_timeout must be a positive number"),
        ({"fill": {"idle_timeout": "30"}}, "[fill] idle_timeout must be a positive number"),
        ({"fill": {"connect_timeout": True}}, "[fill] connect_timeout must be a positive number"),
        ({"fill": {"max_object_size": -5}}, "[fill] max_object_size must be zero or a positive number"),
        ({"fill": {"not_found_ttl": -1}}, "[fill] not_found_ttl must be zero"),
        ({"server": 3}, "[server] must be a table"),
        ({"buckets": []}, "[buckets] must be a table"),
        ({"buckets": {"example-1": 3}}, "[buckets.example-1] must be a table"),
    ],
)
def test_bad_values_name_the_field(data: dict[str, object], fragment: str) -> None:
    """Each invalid value is refused with a message naming its section and field."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert fragment in str(info.value)


def test_empty_document_is_the_defaults() -> None:
    """An empty file gives the documented defaults and no buckets."""
    config = parse_config({})
    assert config.server == ServerConfig()
    assert config.fill == FillConfig()
    assert dict(config.buckets) == {}


def test_extra_sections_kept_raw() -> None:
    """[manhole], [admin] and [log] are kept as plain tables for their features."""
    config = parse_config({"admin": {"listen": "tcp:0"}, "log": {}})
    assert config.extra == {"admin": {"listen": "tcp:0"}, "log": {}}
    with pytest.raises(ConfigError, match=r"\[manhole\] must be a table"):
        parse_config({"manhole": "yes"})


def test_default_file_is_the_embedded_default() -> None:
    """etc/cosedge.toml is byte-identical to the embedded default, and both load."""
    etc = REPO / "etc" / "cosedge.toml"
    embedded = REPO / "cosedge" / "default.toml"
    assert etc.read_bytes() == embedded.read_bytes()
    assert default_config_text() == embedded.read_text("utf-8")
    from_file = load_config(etc)
    assert from_file == load_config(None)
    bucket = from_file.buckets["example-1250000000"]
    assert bucket.origin_pull and bucket.origin == Origin("127.0.0.1", 8081)
    assert from_file.server.domains == ("file.myqcloud.com",)


def test_issue_example_loads(tmp_path: Path) -> None:
    """The configuration shown in the issue loads as written."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nlisten = ["tcp:8080:interface=127.0.0.1"]\ndomains = ["file.myqcloud.com"]\n'
        'data_dir = "var"\n\n[buckets."example-1250000000"]\norigin = "127.0.0.1:8081"\norigin_pull = true\n'
    )
    config = load_config(path)
    assert config.server.listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.buckets["example-1250000000"] == BucketConfig(origin="127.0.0.1:8081", origin_pull=True)


def test_load_config_errors_name_the_file_and_field(tmp_path: Path) -> None:
    """A bad file is reported with its path and the field that is wrong."""
    path = tmp_path / "bad.toml"
    path.write_text('[buckets."example-1250000000"]\norigin = "http://abc.example.com"\norigin_pull = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "[buckets.example-1250000000] origin" in message


def test_load_config_invalid_toml(tmp_path: Path) -> None:
    """A file that is not TOML is reported as such, with its path."""
    path = tmp_path / "broken.toml"
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML"):
        load_config(path)


def test_load_config_missing_or_undecodable_file(tmp_path: Path) -> None:
    """A missing or non-UTF-8 file is a ConfigError naming it, not a traceback."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read"):
        load_config(missing)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{latin}: cannot read"):
        load_config(latin)


def test_evolve_reruns_validators() -> None:
    """A live change built with attrs.evolve is validated just like a loaded one."""
    config = load_config(None)
    bucket = config.buckets["example-1250000000"]
    with pytest.raises(ConfigError, match="origin_pull cannot be enabled"):
        attrs.evolve(bucket, origin=None)
    with pytest.raises(ConfigError, match="scheme"):
        attrs.evolve(bucket, origin="http://x.example")
    with pytest.raises(ConfigError, match="max_concurrent"):
        attrs.evolve(config.fill, max_concurrent=0)
    with pytest.raises(ConfigError, match="domains"):
        attrs.evolve(config.server, domains=())
    with pytest.raises(ConfigError, match="bucket name"):
        attrs.evolve(config, buckets={"BAD": bucket})
    changed = attrs.evolve(bucket, origin="abc.example.com:8080")
    assert changed.origin == Origin("abc.example.com", 8080)
    assert bucket.origin == Origin("127.0.0.1", 8081)  # the old value is untouched


def test_evolve_accepts_its_own_output() -> None:
    """Converters accept their own output, so evolving without changes keeps the value."""
    config = load_config(None)
    assert attrs.evolve(config) == config
    assert attrs.evolve(config.server) == config.server


def test_config_is_immutable() -> None:
    """Neither the config nor its bucket table can be changed in place."""
    config = load_config(None)
    with pytest.raises(TypeError, match="immutable"):
        config.buckets["new-1"] = BucketConfig()  # type: ignore[index]
    with pytest.raises(TypeError):
        del config.buckets["example-1250000000"]  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        config.buckets.clear()  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        config.buckets.update({})  # type: ignore[attr-defined]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.server = ServerConfig()  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.buckets["example-1250000000"].origin_pull = False  # type: ignore[misc]
    buckets = config.buckets
    with pytest.raises(TypeError, match="immutable"):
        buckets |= {"new-1": BucketConfig()}  # type: ignore[operator]
    assert list(config.buckets) == ["example-1250000000"]


def test_config_survives_copy_and_pickle() -> None:
    """A configuration can be deep-copied and pickled (e.g. to keep a snapshot) and stays immutable."""
    config = load_config(None)
    for clone in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone == config
        with pytest.raises(TypeError):
            clone.buckets["new-1"] = BucketConfig()  # type: ignore[index]


def test_with_and_without_bucket_build_new_configs() -> None:
    """Adding or removing a bucket returns a new config and leaves the old one alone."""
    config = Config()
    added = config.with_bucket("new-1", BucketConfig(origin="abc.example.com", origin_pull=True))
    assert "new-1" in added.buckets and "new-1" not in config.buckets
    assert "new-1" not in added.without_bucket("new-1").buckets
    with pytest.raises(ConfigError, match="bucket name"):
        config.with_bucket("Bad", BucketConfig())


def test_buckets_must_be_bucket_configs() -> None:
    """A raw table where a BucketConfig belongs is refused."""
    with pytest.raises(ConfigError, match="must be a BucketConfig"):
        Config(buckets={"example-1": {"origin": "a.example"}})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "kind", ["tcp:8080", "tcp6:8080", "ssl:8443:privateKey=k.pem", "unix:/run/edge.sock", "systemd:domain=INET:index=0"]
)
def test_listeners_several_processes_can_share_are_accepted(kind: str) -> None:
    assert ServerConfig(listen=(kind,), workers=2).workers == 2


def test_a_listener_several_processes_cannot_share_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"listen entry 'onion:80'.*workers = 2.*workers = 1"):
        ServerConfig(listen=("tcp:8080", "onion:80"), workers=2)
    assert ServerConfig(listen=("onion:80",), workers=1).listen == ("onion:80",)
