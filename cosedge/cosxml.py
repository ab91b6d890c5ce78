"""
A bucket's origin rules (:mod:`cosedge.rules`) as COS's ``<OriginConfiguration>``
XML, the body of COS's ``PUT Bucket origin`` and ``GET Bucket origin``, and back.

The schema is COS's: the API reference "PUT Bucket Origin"
(https://cloud.tencent.com/document/product/436/34533, in English
https://www.tencentcloud.com/document/product/436/52813) and the types the
official Go SDK marshals it with (github.com/tencentyun/cos-go-sdk-v5,
``bucket_origin.go``: ``BucketOriginRule``, ``BucketOriginCondition``,
``BucketOriginParameter``, ``BucketOriginHttpHeader``, ``BucketOriginInfo``,
``BucketOriginHostInfo`` with ``StandbyHostName_N``, ``BucketOriginFileInfo``
with ``OriginPrefixConfiguration{Prefix, ReplacedWithPrefix}``,
``OriginSuffixConfiguration{Suffix, ReplacedWithSuffix}`` and
``OriginFixedFileConfiguration{FixedFilePath}``, ``HTTPStandbyCode``).  The
Python SDK (cos-python-sdk-v5 ``put_bucket_origin``) sends whatever dict it is
given under ``OriginConfiguration``, so those element names are the contract.

Names map one to one (:data:`ELEMENTS`).  What COS has and cosedge does not
support (``HTTPStatusCode`` other than 404, ``CopyOriginData`` false on a
proxy or mirror rule, ``HTTPStandbyCode``, private origins, ...), and any
element COS does not define either, is refused by name, never dropped.
``HostHeader`` and ``CaFile`` (in ``OriginParameter``) are cosedge's own,
for the two fields COS has no element for.

Parsing is bounded (:data:`MAX_XML_BYTES`) and safe: expat with no DOCTYPE
and so no entity of any kind, UTF-8 only.  The module is pure: no I/O but
what :class:`~cosedge.rules.Rule` itself does (reading ``ca_file``).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn
from xml.parsers import expat

from .addresses import ConfigError
from .rules import Rule, parse_rule, parse_rules

__all__ = ["ELEMENTS", "MAX_XML_BYTES", "CosXmlError", "rules_from_xml", "rules_to_xml"]

#: The largest document :func:`rules_from_xml` reads: 100 rules of a dozen settings each take about 150 KiB.
MAX_XML_BYTES = 256 * 1024

#: Each rule field and the element of ``OriginRule`` that holds it.
ELEMENTS: Mapping[str, str] = {
    "priority": "RulePriority",
    "type": "OriginType",
    "prefix": "OriginCondition/Prefix",
    "suffix": "OriginCondition/Suffix",
    "protocol": "OriginParameter/Protocol",
    "follow_query_string": "OriginParameter/FollowQueryString",
    "headers_set": "OriginParameter/HttpHeader/NewHttpHeaders/Header",
    "headers_pass": "OriginParameter/HttpHeader/FollowHttpHeaders/Header",
    "follow_redirects": "OriginParameter/FollowRedirection",
    "redirect_code": "OriginParameter/HttpRedirectCode",
    "host_header": "OriginParameter/HostHeader",
    "ca_file": "OriginParameter/CaFile",
    "hosts": "OriginInfo/HostInfo",
    "standby": "OriginInfo/HostInfo/StandbyHostName_N",
    "key_prefix": "OriginInfo/FileInfo/PrefixConfiguration/ReplacedWithPrefix",
    "key_suffix": "OriginInfo/FileInfo/SuffixConfiguration/ReplacedWithSuffix",
    "fixed_file": "OriginInfo/FileInfo/FixedFileConfiguration/FixedFilePath",
}

_TYPES = {"proxy": "Proxy", "mirror": "Mirror", "redirect": "Redirect"}
_PROTOCOLS = {"http": "HTTP", "https": "HTTPS", "follow": "FOLLOW"}
_STANDBY = re.compile(r"^StandbyHostName_([1-9][0-9]{0,2})\Z")

#: Elements COS defines that cosedge does not support, and why.
_UNSUPPORTED = {
    "HTTPStandbyCode": "cosedge turns to the standby hosts on refused connections, time-outs and 5xx only",
    "FollowRedirectionConfiguration": "cosedge follows an origin's redirects as they are",
    "ForbidFollowHeaders": "cosedge passes only the headers FollowHttpHeaders lists",
    "ForbidFollowHttpHeaders": "cosedge passes only the headers FollowHttpHeaders lists",
    "PrivateHost": "private (signed) origins are not supported",
    "FilterHost": "cosedge does not filter by the requested domain",
    "PrefixDirective": "the old FileInfo form; use PrefixConfiguration",
}


class CosXmlError(ConfigError):
    """An ``<OriginConfiguration>`` that cosedge cannot take; :attr:`element` is where."""

    def __init__(self, element: str, problem: str) -> None:
        super().__init__(f"<{element}>: {problem}")
        self.element = element
        self.problem = problem


# -- rules to XML --


def _unsupported(where: str, what: str, reason: str) -> CosXmlError:
    return CosXmlError(where, f"COS's {what} is not supported by cosedge: {reason}")


def _leaf(parent: ET.Element, tag: str, text: object) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.text = str(text).lower() if isinstance(text, bool) else str(text)
    return element


def _rule_element(rule: Rule) -> ET.Element:
    element = ET.Element("OriginRule")
    _leaf(element, "RulePriority", rule.priority)
    _leaf(element, "OriginType", _TYPES[rule.type])
    condition = ET.SubElement(element, "OriginCondition")
    _leaf(condition, "HTTPStatusCode", 404)
    _leaf(condition, "Prefix", rule.prefix)
    if rule.suffix:
        _leaf(condition, "Suffix", rule.suffix)
    parameter = ET.SubElement(element, "OriginParameter")
    _leaf(parameter, "Protocol", _PROTOCOLS[rule.protocol])
    _leaf(parameter, "FollowQueryString", rule.follow_query_string)
    if rule.headers_set or rule.headers_pass:
        header = ET.SubElement(parameter, "HttpHeader")
        _leaf(header, "FollowAllHeaders", False)
        if rule.headers_set:
            new = ET.SubElement(header, "NewHttpHeaders")
            for name, value in rule.headers_set:
                pair = ET.SubElement(new, "Header")
                _leaf(pair, "Key", name)
                _leaf(pair, "Value", value)
        if rule.headers_pass:
            follow = ET.SubElement(header, "FollowHttpHeaders")
            for name in rule.headers_pass:
                _leaf(ET.SubElement(follow, "Header"), "Key", name)
    _leaf(parameter, "FollowRedirection", rule.follow_redirects)
    _leaf(parameter, "HttpRedirectCode", rule.redirect_code)
    if rule.type != "redirect":
        _leaf(parameter, "CopyOriginData", True)
    if rule.host_header is not None:
        _leaf(parameter, "HostHeader", rule.host_header)
    if rule.ca_file is not None:
        _leaf(parameter, "CaFile", rule.ca_file)
    info = ET.SubElement(element, "OriginInfo")
    for i, host in enumerate(rule.hosts):
        host_info = ET.SubElement(info, "HostInfo")
        _leaf(host_info, "HostName", host)
        _leaf(host_info, "Weight", host.weight)
        for n, standby in enumerate(rule.standby if i == 0 else (), start=1):
            _leaf(host_info, f"StandbyHostName_{n}", standby)
    if rule.key_prefix is not None or rule.key_suffix is not None or rule.fixed_file is not None:
        file_info = ET.SubElement(info, "FileInfo")
        if rule.fixed_file is not None:
            _leaf(ET.SubElement(file_info, "FixedFileConfiguration"), "FixedFilePath", rule.fixed_file)
        if rule.key_prefix is not None:
            config = ET.SubElement(file_info, "PrefixConfiguration")
            _leaf(config, "Prefix", rule.prefix)
            _leaf(config, "ReplacedWithPrefix", rule.key_prefix)
        if rule.key_suffix is not None:
            config = ET.SubElement(file_info, "SuffixConfiguration")
            _leaf(config, "Suffix", rule.suffix)
            _leaf(config, "ReplacedWithSuffix", rule.key_suffix)
    return element


def rules_to_xml(rules: Iterable[Rule]) -> bytes:
    """The rules as COS's ``<OriginConfiguration>`` document (UTF-8, indented)."""
    root = ET.Element("OriginConfiguration")
    root.extend(_rule_element(rule) for rule in rules)
    ET.indent(root)
    text = ET.tostring(root, encoding="unicode", short_empty_elements=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + text.encode("utf-8") + b"\n"


# -- XML to rules --


class _Refused(Exception):
    """Raised from an expat handler: the document uses a construct cosedge never reads."""


def safe_parser(
    refuse: Callable[..., NoReturn],
    start: Callable[..., Any],
    end: Callable[..., Any],
    text: Callable[[str], Any],
    namespace_separator: str | None = None,
    encoding: str | None = "utf-8",
) -> Any:
    """
    An expat parser that never loads an entity or a DTD: ``refuse`` is
    called on a DOCTYPE or an entity declaration (and must raise).
    """
    parser = expat.ParserCreate(encoding, namespace_separator)
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    return parser


def _refuse_doctype(*args: object) -> NoReturn:
    raise _Refused("a DOCTYPE (and so any entity) is not accepted")


def _parse(data: object) -> ET.Element:
    if not isinstance(data, bytes | bytearray):
        raise CosXmlError("OriginConfiguration", f"expected the XML document as bytes, not {type(data).__name__}")
    if len(data) > MAX_XML_BYTES:
        raise CosXmlError("OriginConfiguration", f"the document has {len(data)} bytes; at most {MAX_XML_BYTES}")
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CosXmlError("OriginConfiguration", f"the document is not UTF-8 ({e.reason} at byte {e.start})") from None
    builder = ET.TreeBuilder()
    parser = safe_parser(_refuse_doctype, builder.start, builder.end, builder.data)
    try:
        parser.Parse(bytes(data), True)
        root = builder.close()
    except _Refused as e:
        raise CosXmlError("OriginConfiguration", str(e)) from None
    except expat.ExpatError as e:
        raise CosXmlError(
            "OriginConfiguration",
            f"not well-formed XML: {expat.ErrorString(e.code)} at line {e.lineno}, column {e.offset}",
        ) from None
    if root.tag != "OriginConfiguration":
        raise CosXmlError(root.tag, "the document must be an <OriginConfiguration>")
    _check_attributes(root, "OriginConfiguration", allowed=("xmlns",))
    return root


def _check_attributes(element: ET.Element, path: str, allowed: tuple[str, ...] = ()) -> None:
    extra = sorted(set(element.attrib) - set(allowed))
    if extra:
        raise CosXmlError(path, f"attribute {extra[0]!r} is not part of COS's schema")


def _children(
    element: ET.Element, path: str, known: tuple[str, ...], repeated: tuple[str, ...] = ()
) -> dict[str, list[ET.Element]]:
    """The child elements by tag; any other child, text or a repeated single element is refused by name."""
    if element.text and element.text.strip():
        raise CosXmlError(path, f"unexpected text {element.text.strip()[:40]!r}; it holds elements only")
    found: dict[str, list[ET.Element]] = {}
    for child in element:
        where = f"{path}/{child.tag}"
        _check_attributes(child, where)
        if child.tail and child.tail.strip():
            raise CosXmlError(path, f"unexpected text {child.tail.strip()[:40]!r}; it holds elements only")
        tag = "StandbyHostName_N" if _STANDBY.match(child.tag) and "StandbyHostName_N" in known else child.tag
        if tag not in known:
            reason = _UNSUPPORTED.get(child.tag) or (
                "private (signed) origins are not supported" if child.tag.startswith("PrivateStandbyHost_") else None
            )
            if reason is not None:
                raise _unsupported(where, f"<{child.tag}>", reason)
            raise CosXmlError(where, f"unknown element; <{path.rsplit('/', 1)[-1]}> may hold {', '.join(known)}")
        if found.get(tag) and tag not in repeated:
            raise CosXmlError(where, "given twice")
        found.setdefault(tag, []).append(child)
    return found


def _text(element: ET.Element, path: str) -> str:
    if len(element):
        raise CosXmlError(f"{path}/{element[0].tag}", f"<{element.tag}> holds a value, not elements")
    return element.text or ""


def _one(found: dict[str, list[ET.Element]], tag: str, path: str, *, required: bool = False) -> str | None:
    elements = found.get(tag)
    if not elements:
        if required:
            raise CosXmlError(f"{path}/{tag}", "is required")
        return None
    return _text(elements[0], f"{path}/{tag}")


def _flag(value: str | None, where: str) -> bool | None:
    if value is None:
        return None
    if value.strip() not in ("true", "false"):
        raise CosXmlError(where, f"must be true or false, not {value!r}")
    return value.strip() == "true"


def _number(value: str, where: str) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise CosXmlError(where, f"must be a whole number, not {value!r}")
    return int(text)


def _choice(value: str, where: str, names: Mapping[str, str]) -> str:
    for ours, theirs in names.items():
        if value.strip() == theirs:
            return ours
    raise CosXmlError(where, f"must be one of {', '.join(names.values())}, not {value!r}")


def _condition(element: ET.Element, path: str, table: dict[str, Any]) -> None:
    found = _children(element, path, ("HTTPStatusCode", "Prefix", "Suffix"))
    code = _one(found, "HTTPStatusCode", path)
    if code is not None and code.strip() != "404":
        what = f"<HTTPStatusCode> {code.strip()!r}"
        raise _unsupported(f"{path}/HTTPStatusCode", what, "its rules act on a missing key (404)")
    for tag, name in (("Prefix", "prefix"), ("Suffix", "suffix")):
        value = _one(found, tag, path)
        if value:
            table[name] = value


def _headers(element: ET.Element, path: str, table: dict[str, Any]) -> None:
    found = _children(element, path, ("FollowAllHeaders", "NewHttpHeaders", "FollowHttpHeaders"))
    if _flag(_one(found, "FollowAllHeaders", path), f"{path}/FollowAllHeaders"):
        what, reason = "<FollowAllHeaders> true", "list the headers to pass in <FollowHttpHeaders>"
        raise _unsupported(f"{path}/FollowAllHeaders", what, reason)
    for tag, name, keys in (
        ("NewHttpHeaders", "headers_set", ("Key", "Value")),
        ("FollowHttpHeaders", "headers_pass", ("Key",)),
    ):
        for container in found.get(tag, []):
            where = f"{path}/{tag}"
            pairs: list[list[str]] = []
            for header in _children(container, where, ("Header",), ("Header",)).get("Header", []):
                fields = _children(header, f"{where}/Header", keys)
                pairs.append([_one(fields, k, f"{where}/Header", required=True) or "" for k in keys])
            table[name] = {k: v for k, v in pairs} if name == "headers_set" else [p[0] for p in pairs]


def _parameter(element: ET.Element, path: str, table: dict[str, Any]) -> None:
    known = (
        "Protocol",
        "TransparentErrorCode",
        "FollowQueryString",
        "HttpHeader",
        "FollowRedirection",
        "HttpRedirectCode",
        "CopyOriginData",
        "HostHeader",
        "CaFile",
    )
    found = _children(element, path, known)
    table["protocol"] = _choice(_one(found, "Protocol", path, required=True) or "", f"{path}/Protocol", _PROTOCOLS)
    if _flag(_one(found, "TransparentErrorCode", path), f"{path}/TransparentErrorCode"):
        what, reason = "<TransparentErrorCode> true", "an origin's error is answered as COS does"
        raise _unsupported(f"{path}/TransparentErrorCode", what, reason)
    for tag, name, default in (
        ("FollowQueryString", "follow_query_string", True),
        ("FollowRedirection", "follow_redirects", True),
    ):
        value = _flag(_one(found, tag, path), f"{path}/{tag}")
        table[name] = default if value is None else value  # absent: COS's default
    code = _one(found, "HttpRedirectCode", path)
    if code is not None:
        table["redirect_code"] = _number(code, f"{path}/HttpRedirectCode")
    copy = _flag(_one(found, "CopyOriginData", path), f"{path}/CopyOriginData")
    if copy is not None and copy != (table["type"] != "redirect"):
        if copy:
            raise CosXmlError(f"{path}/CopyOriginData", "a redirect rule copies nothing; leave it out or false")
        reason = f"a {table['type']} rule stores the object it fetches"
        raise _unsupported(f"{path}/CopyOriginData", "<CopyOriginData> false", reason)
    for tag, name in (("HostHeader", "host_header"), ("CaFile", "ca_file")):
        text = _one(found, tag, path)
        if text is not None:
            table[name] = text
    for header in found.get("HttpHeader", []):
        _headers(header, f"{path}/HttpHeader", table)


def _host_info(element: ET.Element, path: str, first: bool, table: dict[str, Any]) -> None:
    found = _children(element, path, ("HostName", "Weight", "StandbyHostName_N"), ("StandbyHostName_N",))
    name = _one(found, "HostName", path, required=True)
    weight = _one(found, "Weight", path)
    table["hosts"].append(name if weight is None else {"host": name, "weight": _number(weight, f"{path}/Weight")})
    standby = found.get("StandbyHostName_N", [])
    if standby and not first:
        raise CosXmlError(
            f"{path}/{standby[0].tag}",
            "cosedge's standby hosts belong to the rule: give them all in the first <HostInfo>",
        )
    numbered: dict[int, str] = {}
    for element_n in standby:
        n = int(element_n.tag.rsplit("_", 1)[1])
        if n in numbered:
            raise CosXmlError(f"{path}/{element_n.tag}", "given twice")
        numbered[n] = _text(element_n, f"{path}/{element_n.tag}")
    if numbered:
        table["standby"] = [numbered[n] for n in sorted(numbered)]


def _rewrite(found: dict[str, list[ET.Element]], path: str, tag: str, part: str, table: dict[str, Any]) -> None:
    """``PrefixConfiguration``/``SuffixConfiguration``: the condition's prefix (suffix) replaced for the origin."""
    for element in found.get(tag, []):
        where = f"{path}/{tag}"
        fields = _children(element, where, (part, f"ReplacedWith{part}"))
        name = part.lower()
        replaced = _one(fields, part, where)
        if replaced is not None and replaced != table.get(name, ""):
            raise CosXmlError(
                f"{where}/{part}",
                f"cosedge replaces the rule's own {name} (<OriginCondition><{part}>, here"
                f" {table.get(name, '')!r}), not {replaced!r}",
            )
        table[f"key_{name}"] = _one(fields, f"ReplacedWith{part}", where, required=True)


def _info(element: ET.Element, path: str, table: dict[str, Any]) -> None:
    found = _children(element, path, ("HostInfo", "FileInfo"), ("HostInfo",))
    if "HostInfo" not in found:
        raise CosXmlError(f"{path}/HostInfo", "is required: a rule names at least one origin host")
    table["hosts"] = []
    for i, host in enumerate(found["HostInfo"]):
        _host_info(host, f"{path}/HostInfo", i == 0, table)
    for file_info in found.get("FileInfo", []):
        where = f"{path}/FileInfo"
        known = ("FixedFileConfiguration", "PrefixConfiguration", "SuffixConfiguration")
        legacy = {"Prefix", "Suffix"} & {child.tag for child in file_info}
        if legacy:
            tag = sorted(legacy)[0]
            reason = f"use <{tag}Configuration> with <ReplacedWith{tag}>"
            raise _unsupported(f"{where}/{tag}", f"old <FileInfo><{tag}>", reason)
        parts = _children(file_info, where, known)
        for fixed in parts.get("FixedFileConfiguration", []):
            inner = _children(fixed, f"{where}/FixedFileConfiguration", ("FixedFilePath",))
            table["fixed_file"] = _one(inner, "FixedFilePath", f"{where}/FixedFileConfiguration", required=True)
        _rewrite(parts, where, "PrefixConfiguration", "Prefix", table)
        _rewrite(parts, where, "SuffixConfiguration", "Suffix", table)


_SECTIONS = {"OriginCondition": _condition, "OriginParameter": _parameter, "OriginInfo": _info}


def _rule(element: ET.Element, path: str) -> Rule:
    found = _children(element, path, ("RulePriority", "OriginType", *_SECTIONS))
    table: dict[str, Any] = {
        "priority": _number(_one(found, "RulePriority", path, required=True) or "", f"{path}/RulePriority"),
        "type": _choice(_one(found, "OriginType", path, required=True) or "", f"{path}/OriginType", _TYPES),
    }
    path = f"OriginRule[RulePriority={table['priority']}]"
    for tag, read in _SECTIONS.items():
        if tag not in found and tag != "OriginCondition":
            raise CosXmlError(f"{path}/{tag}", "is required")
        for section in found.get(tag, []):
            read(section, f"{path}/{tag}", table)
    try:
        return parse_rule(table)
    except ConfigError as e:
        raise CosXmlError(f"{path}/{_element_of(str(e))}", str(e)) from None


def _element_of(message: str) -> str:
    """The element of the first rule field a validation message names."""
    text = message.split(": ", 1)[1] if message.startswith("rule priority") else message
    if re.search(r"\bweight\b", text):
        return "OriginInfo/HostInfo/Weight"
    positions = [(m.start(), name) for name in ELEMENTS for m in [re.search(rf"\b{name}\b", text)] if m]
    return ELEMENTS[min(positions)[1]] if positions else "OriginRule"


def rules_from_xml(data: bytes) -> tuple[Rule, ...]:
    """
    The rules of a COS ``<OriginConfiguration>`` document, sorted by priority.

    :raises CosXmlError: naming the element that is wrong, unsupported or unknown.
    """
    root = _parse(data)
    found = _children(root, "OriginConfiguration", ("OriginRule",), ("OriginRule",))
    rules = [_rule(element, "OriginRule") for element in found.get("OriginRule", [])]
    try:
        return parse_rules(rules)
    except ConfigError as e:
        raise CosXmlError("OriginRule/RulePriority", str(e)) from None
