"""Configuration: defaults -> config file -> $VAR expansion -> environment -> flags -> validate.

The file is JSON. After it is parsed, every string value is expanded: ``$VAR`` and ``${VAR}``
take the environment variable (unset is an error that names the key, so typos surface at start),
``${VAR:-default}`` gives a default, ``$$`` is a literal ``$``. Then ``PROXY_LLM_LISTEN``,
``PROXY_LLM_DATA_DIR``, ``PROXY_LLM_LOG_LEVEL`` and ``PROXY_LLM_UPSTREAM_PROXY`` override the
file, and command-line flags override both (no flag takes a proxy URL: a command line is
visible to every user of the host, and the URL may hold a password). Every problem raises :class:`ConfigError` with a one-line message naming the file
and the key (or the line, for invalid JSON), the environment variable and the key, or the flag.

This module imports nothing from the package.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple, Union

PROVIDER_TYPES = ("openai", "anthropic", "gemini", "azure")
FSYNC_MODES = ("interval", "always", "never")
ON_RECORD_ERROR = ("fail_open", "fail_closed")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

MiB = 1024 * 1024

# Every top-level key with its default. A key not listed here is an error ("unknown key").
DEFAULTS: Dict[str, Any] = {
    "listen": "127.0.0.1:8080",
    "data_dir": "./data",
    "session_header": "X-Session-Id",
    "providers": [],
    "upstream_proxy": "",
    "no_proxy": [],
    "log_level": "INFO",
    "record": True,
    "fsync": "interval",
    "fsync_interval": 1.0,
    "max_file_size": 100 * MiB,
    "rotate_daily": True,
    "compress_rotated": False,
    "queue_size": 10000,
    "queue_max_bytes": 512 * MiB,
    "on_record_error": "fail_open",
    "max_request_body": 32 * MiB,
    "capture_max_body": 16 * MiB,
    "max_sse_event": 8 * MiB,
    "connect_timeout": 10.0,
    "response_header_timeout": 600.0,
    "stream_idle_timeout": 300.0,
    "total_timeout": None,
    "client_header_timeout": 30.0,
    "client_idle_timeout": 120.0,
    "max_connections": 4096,
    "shutdown_timeout": 25.0,
    "proxy_keys": [],
    "workers": 1,
}

PROVIDER_KEYS = ("name", "type", "base_url", "api_key", "models", "ca_file", "proxy")

_VAR_RE = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<default>:-[^}$]*)?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<other>\{))"  # any other ${...} (${VAR-x}, ${1}, a $ in a default): refused, not left as text
)


class ConfigError(Exception):
    """A configuration problem, described in one line fit for the user."""


@dataclass(frozen=True)
class Provider:
    name: str
    type: str
    base_url: str
    api_key: str = field(default="", repr=False)  # (a secret: never in a repr, a log line's or a traceback's)
    models: Tuple[str, ...] = ()
    # A PEM bundle that replaces the system's for this provider's TLS ("": the system's, which
    # OpenSSL takes from $SSL_CERT_FILE / $SSL_CERT_DIR when set): an absolute path.
    ca_file: str = ""
    # The egress proxy this provider is reached through, resolved (its own ``proxy``, else
    # ``upstream_proxy`` unless bypassed: see resolve_proxy): "" for a direct connection. It
    # may hold the proxy's password, so it is left out of the repr.
    proxy: str = field(default="", repr=False)

    def matches(self, model: Optional[str]) -> Optional[str]:
        """Return the first glob of ``models`` matching ``model``, or None."""
        if not model:
            return None
        for pattern in self.models:
            if fnmatch.fnmatchcase(model, pattern):
                return pattern
        return None


@dataclass(frozen=True)
class Config:
    listen: str = DEFAULTS["listen"]
    data_dir: str = DEFAULTS["data_dir"]
    session_header: str = DEFAULTS["session_header"]
    providers: Tuple[Provider, ...] = ()
    upstream_proxy: str = field(default="", repr=False)  # (may hold a password)
    no_proxy: Tuple[str, ...] = ()
    log_level: str = DEFAULTS["log_level"]
    record: bool = True
    fsync: str = "interval"
    fsync_interval: float = 1.0
    max_file_size: int = DEFAULTS["max_file_size"]
    rotate_daily: bool = True
    compress_rotated: bool = False
    queue_size: int = 10000
    queue_max_bytes: int = DEFAULTS["queue_max_bytes"]
    on_record_error: str = "fail_open"
    max_request_body: int = DEFAULTS["max_request_body"]
    capture_max_body: int = DEFAULTS["capture_max_body"]
    max_sse_event: int = DEFAULTS["max_sse_event"]
    connect_timeout: float = 10.0
    response_header_timeout: float = 600.0
    stream_idle_timeout: float = 300.0
    total_timeout: Optional[float] = None
    client_header_timeout: float = 30.0
    client_idle_timeout: float = 120.0
    max_connections: int = 4096
    shutdown_timeout: float = 25.0
    proxy_keys: Tuple[str, ...] = field(default=(), repr=False)  # (secrets, as api_key)
    workers: int = 1
    source: str = field(default="<defaults>", compare=False)
    # Where data_dir came from, as config errors name it (the file, $PROXY_LLM_DATA_DIR or
    # --data-dir): the data dir is checked at start, after validation (see data_dir_error).
    data_dir_origin: str = field(default="<defaults>", compare=False)

    @property
    def host_port(self) -> Tuple[str, int]:
        return parse_listen(self.listen)


def parse_listen(value: str) -> Tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6). Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isdigit() and port.isascii()) or not host:  # ("\u0668".isdigit() is true)
        raise ValueError("expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError("port out of range")
    return host, number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def expand(value: str, env: Mapping[str, str], where: str) -> str:
    """Expand ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``$$`` in one string value."""

    def substitute(match: "re.Match[str]") -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("other"):
            raise ConfigError("%s: only $VAR, ${VAR} and ${VAR:-default} are expanded ($$ for a $)" % where)
        name = match.group("braced") or match.group("bare")
        default = match.group("default")
        if name in env:
            if default is not None and env[name] == "":
                return default[2:]
            return env[name]
        if default is not None:
            return default[2:]
        raise ConfigError("%s: $%s is not set (use ${%s:-} for an empty default)" % (where, name, name))

    return _VAR_RE.sub(substitute, value)


_NUMBER_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")


def _typed(key: str, value: Any) -> Any:
    """A top-level string that was a ``$VAR`` template, as the type its setting takes: true or
    false for a switch, a number for a size, a count or a time (as an environment variable's
    value is read). Anything else is left as it is, for validate to refuse."""
    default = DEFAULTS.get(key)
    if not isinstance(value, str):
        return value
    text = value.strip()
    if isinstance(default, bool):
        return {"true": True, "false": False}.get(text.lower(), value)
    if key == "total_timeout" and not text:  # (${TOTAL_TIMEOUT:-}: none, its default)
        return None
    if (isinstance(default, (int, float)) or key == "total_timeout") and _NUMBER_TEXT.match(text):
        return float(text) if "." in text else int(text)
    return value


def _expand_tree(value: Any, env: Mapping[str, str], where: str, depth: int = 0) -> Any:
    if depth > 32:  # no setting nests this deep
        raise ConfigError("%s: nested too deep" % (where or "config"))
    if isinstance(value, str):
        return expand(value, env, where)
    if isinstance(value, list):
        return [_expand_tree(v, env, "%s[%d]" % (where, i), depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand_tree(v, env, "%s.%s" % (where, k) if where else k, depth + 1) for k, v in value.items()}
    return value


class _NotANumber:
    """What the decoder makes of a number it refuses (``NaN``, ``Infinity``, an integer past
    the interpreter's digit limit), kept in its place so that the error can name its key:
    the decoder's hooks are not told where they are, and an exception raised in one named
    neither the key nor the line."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def _refuse_constant(name: str) -> _NotANumber:
    return _NotANumber("%s is not a number JSON allows" % name)


def _parse_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError as exc:  # past sys.get_int_max_str_digits() (3.11+)
        return _NotANumber(str(exc))


def _not_a_number(data: Any) -> Optional[Tuple[str, str]]:
    """The first refused number in a parsed file, as (key, message); None when there is none.
    Iterative: the file may nest as deep as the decoder took."""
    todo = [("", data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, _NotANumber):
            return where, value.message
        if isinstance(value, dict):
            items = [("%s.%s" % (where, k) if where else k, v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [("%s[%d]" % (where, i), v) for i, v in enumerate(value)]
        else:
            continue
        todo.extend(reversed(items))
    return None


def _no_duplicates(pairs):
    """An object's pairs as a dict; a key given twice is refused (the parser kept the last,
    without a word: two "providers" arrays, the first one lost)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("duplicate key %s" % json.dumps(key))
        out[key] = value
    return out


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_parse_int, object_pairs_hook=_no_duplicates)
_MAX_SECONDS = 10.0 ** 7  # ~116 days: past any timeout, within what a socket and a sleep take
_MAX_WORKERS = 256


def read_file(path: str) -> Dict[str, Any]:
    """Parse the JSON config file; errors name the file and the line (the key, for a number
    JSON does not allow)."""
    try:
        with open(path, "r", encoding="utf-8-sig") as f:  # (a BOM, as Notepad writes it, is no JSON error)
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("%s: no such config file" % path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("%s: cannot read: %s" % (path, exc)) from None
    try:
        data = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("%s: line %d column %d: invalid JSON: %s" % (path, exc.lineno, exc.colno, exc.msg)) from None
    except (ValueError, RecursionError) as exc:  # nesting
        raise ConfigError("%s: invalid JSON: %s" % (path, type(exc).__name__ if isinstance(exc, RecursionError)
                                                    else exc)) from None
    if not isinstance(data, dict):
        raise ConfigError("%s: the top level must be a JSON object" % path)
    refused = _not_a_number(data)
    if refused is not None:
        raise ConfigError("%s: %s: invalid JSON: %s" % (path, refused[0], refused[1]))
    return data


def load(
    path: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> Config:
    """Build the effective configuration. See the module docstring for the order.

    ``path`` None means defaults only. ``overrides`` are flag values (None values are ignored).
    A relative ``data_dir`` from the file is resolved against the file's directory; one from the
    environment or a flag against the current directory.
    """
    env = os.environ if env is None else env
    source = path or "<defaults>"
    raw: Dict[str, Any] = {}
    if path is not None:
        raw = read_file(path)
    for key in raw:
        if key not in DEFAULTS:
            raise ConfigError("%s: %s: unknown key" % (source, key))
    templated = [key for key, value in raw.items() if isinstance(value, str) and "$" in value]
    try:
        raw = _expand_tree(raw, env, "")
    except ConfigError as exc:
        raise ConfigError("%s: %s" % (source, exc)) from None
    for key in templated:  # ("queue_size": "${QUEUE_SIZE:-10000}": a number, once expanded)
        raw[key] = _typed(key, raw[key])
    merged = dict(DEFAULTS)
    merged.update(raw)
    empty_data_dir = False
    if path is not None and "data_dir" in raw and isinstance(raw["data_dir"], str):
        # (Empty, it meant the file's directory: an unset variable? Refused below, unless the
        # environment or a flag gives one.)
        empty_data_dir = not raw["data_dir"].strip()
        base = os.path.dirname(os.path.abspath(path))
        merged["data_dir"] = os.path.normpath(os.path.join(base, os.path.expanduser(raw["data_dir"])))
    where = dict.fromkeys(merged, source)
    for key, var in (("listen", "PROXY_LLM_LISTEN"), ("data_dir", "PROXY_LLM_DATA_DIR"), ("log_level", "PROXY_LLM_LOG_LEVEL"),
                     ("upstream_proxy", "PROXY_LLM_UPSTREAM_PROXY")):
        if env.get(var):
            merged[key] = env[var]
            where[key] = "$" + var
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
            where[key] = "--" + key.replace("_", "-")
    if empty_data_dir and where["data_dir"] == source:
        raise ConfigError("%s: data_dir: an empty path" % source)
    if where["data_dir"] != source and isinstance(merged["data_dir"], str):
        # (~ is the shell's, and none expands it in "--data-dir=~/x" or a unit's Environment=)
        merged["data_dir"] = os.path.expanduser(merged["data_dir"])
    return validate(merged, where, source)


def _fail(where: Mapping[str, str], key: str, message: str) -> ConfigError:
    """The one-line error about ``key``, prefixed by where its value came from: the file or
    ``$VAR`` and then the key (``config.json: providers[1].base_url: ...``), or the flag alone,
    which names its key itself (``--workers: must be at least 1``, not ``--workers: workers: ...``)."""
    origin = where.get(key.split("[")[0].split(".")[0], "config")
    if origin.startswith("--"):
        return ConfigError("%s: %s" % (origin, message))
    return ConfigError("%s: %s: %s" % (origin, key, message))


def _number(merged: Dict[str, Any], where: Mapping[str, str], key: str, kind: type, minimum: float, optional: bool = False,
            maximum: float = float("inf")) -> Any:
    value = merged[key]
    if optional and value is None:
        return None
    if isinstance(value, str) and where.get(key, "").startswith(("$", "--")):
        try:
            value = kind(value) if value.isascii() else None
        except ValueError:
            value = None
        if value is None:
            raise _fail(where, key, "not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise _fail(where, key, "must be %s" % ("an integer" if kind is int else "a number"))
    if not minimum <= value <= maximum:  # (NaN passes neither)
        raise _fail(where, key, "must be at least %s" % minimum if not value >= minimum
                    else "must be at most %s" % maximum)
    return kind(value)


_URL_CHARS = re.compile(r"[!-~]+\Z")
# What http.client sends in a header value: Latin-1, no control character but tab.
_HEADER_VALUE = re.compile("[\t\x20-\x7e\xa0-\xff]*\\Z")


def _split_url(url: Any, where: Mapping[str, str], key: str, what: str) -> Tuple[urllib.parse.SplitResult, Optional[int]]:
    """A URL's parts and port, or the error saying it is not ``what`` ("a URL", "a proxy
    URL"), without repeating it."""
    if not isinstance(url, str) or not _URL_CHARS.match(url):
        raise _fail(where, key, "not %s (visible ASCII only: percent-encode the rest)" % what)
    try:
        parts = urllib.parse.urlsplit(url)
        return parts, parts.port
    except ValueError:
        raise _fail(where, key, "not %s (bad host or port)" % what) from None


def _validate_url(url: Any, where: Mapping[str, str], key: str) -> str:
    parts, port = _split_url(url, where, key, "a URL")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise _fail(where, key, "not a URL (expected http(s)://host[:port][/base-path])")
    if parts.username is not None or parts.password is not None:
        raise _fail(where, key, "credentials in the URL are not sent: use api_key")
    if port == 0:
        raise _fail(where, key, "not a URL (bad port)")
    return url.rstrip("/")


def _check_azure_url(url: str, where: Mapping[str, str], key: str) -> None:
    """An azure provider's base_url is the resource's endpoint (``AZURE_OPENAI_ENDPOINT``), to
    which the client's path, ``/openai/...`` included, is appended: one that already ends in
    ``/openai``, or names a deployment or the v1 API (an SDK's base_url, copied), would send
    ``/openai/openai/...``, which Azure answers 404 on every request."""
    path = urllib.parse.urlsplit(url).path
    if path.endswith("/openai") or "/openai/" in path:
        raise _fail(where, key, "an azure provider's base_url is the resource's endpoint "
                                "(https://<resource>.openai.azure.com), without /openai...: "
                                "clients' paths begin with /openai/")


_VERSION_SUFFIX = re.compile(r"/v[0-9]+(?:alpha|beta)?[0-9]*/?\Z")


def _check_version_suffix(url: str, where: Mapping[str, str], key: str) -> None:
    """A base_url is where the client's path goes: it already begins with the API version
    (``/v1/chat/completions``, ``/v1beta/models/...``). One that ends in a version, as an SDK's
    base_url does (``OPENAI_BASE_URL``, vLLM's ``http://host:8000/v1``), would send
    ``/v1/v1/...``, which every server answers 404."""
    path = urllib.parse.urlsplit(url).path
    if _VERSION_SUFFIX.search(path):
        raise _fail(where, key, "ends in an API version (%s): clients' paths begin with it, so leave it out "
                                "(the SDK's base_url has it, the proxy's does not)" % path.rstrip("/").rsplit("/", 1)[1])


def _validate_ca_file(p: Dict[str, Any], base_url: str, where: Mapping[str, str], key: str, source: str) -> str:
    """A provider's ``ca_file``, checked at start: an https provider's, a file that holds PEM
    certificates (a missing one, an unreadable one, or one without a certificate would make
    every request a 502, found one request at a time). A relative path is relative to the
    config file's directory (as data_dir is). Returns the absolute path, or "" for none."""
    ca_file = p.get("ca_file", "")
    if ca_file is None or ca_file == "":
        return ""
    if not isinstance(ca_file, str):
        raise _fail(where, key, "must be a string (a path to a PEM file)")
    if urllib.parse.urlsplit(base_url).scheme.lower() != "https":  # (HTTPS://, as the pool reads it)
        raise _fail(where, key, "only an https base_url uses a ca_file")
    path = os.path.expanduser(ca_file)
    if not os.path.isabs(path) and source != "<defaults>":
        path = os.path.join(os.path.dirname(os.path.abspath(source)), path)
    path = os.path.normpath(path)
    try:
        with open(path, "rb"):  # (the error a missing or unreadable file gives, in its words)
            pass
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise _fail(where, key, "%s holds no PEM certificate" % path) from None
    except (OSError, ValueError) as exc:
        raise _fail(where, key, "cannot read %s: %s" % (path, getattr(exc, "strerror", None) or exc)) from None
    return path


# Proxy schemes people write that proxy_llm does not speak: named in the error (any other scheme
# is not, since what urlsplit takes for one may be the user name of a URL without a scheme).
_OTHER_PROXIES = ("https", "socks", "socks4", "socks4a", "socks5", "socks5h")


def _validate_proxy(value: Any, where: Mapping[str, str], key: str) -> str:
    """An egress proxy URL, ``http://[user:password@]host[:port]`` (port 80 if none), or "" for
    none. Errors never repeat the value: it may hold a password (and come from a $VAR)."""
    if not isinstance(value, str):
        raise _fail(where, key, "must be a string (http://[user:password@]host:port, or \"\" for none)")
    if value == "":
        return ""
    expected = "not a proxy URL (expected http://[user:password@]host:port)"
    parts, port = _split_url(value, where, key, "a proxy URL")
    if parts.scheme in _OTHER_PROXIES:
        raise _fail(where, key, "%s:// proxies are not supported: give an http:// proxy (https providers are "
                                "tunnelled through it with CONNECT, so TLS still runs end to end)" % parts.scheme)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _fail(where, key, expected)
    if port == 0:
        raise _fail(where, key, "not a proxy URL (bad port)")
    return value


def _no_proxy_entries(value: Any, where: Mapping[str, str]) -> Tuple[str, ...]:
    """``no_proxy``: a list of strings, or one comma-separated string (what ``$NO_PROXY``
    holds, for ``"${NO_PROXY:-}"``), read as curl and Go's ``httpproxy`` read ``NO_PROXY``
    (see :func:`no_proxy_entry`). Each entry is checked and kept in its normal form (lower
    case, without ``*.``, a leading ``.`` or blanks); an entry that could never match (a bad
    port or network, a ``*`` inside a name) stops start-up rather than pass unnoticed."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, "no_proxy", "must be a list of strings, or a comma-separated string")
    entries = []
    for entry in value:
        try:
            parsed = no_proxy_entry(entry)
        except ValueError as exc:
            raise _fail(where, "no_proxy", "\"%s\": %s" % (entry.strip(), exc)) from None
        if parsed is not None:
            kind, host, port = parsed
            if kind == "*":
                host = "*"
            elif kind == "ip" and ":" in host and port:
                host = "[%s]" % host
            entries.append(host + (":%d" % port if port else ""))
    return tuple(entries)


# A host name in a no_proxy entry (an internationalised one in its ASCII form): letters,
# digits, - and _, in labels apart by dots.
_NO_PROXY_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\Z")


def no_proxy_entry(entry: str) -> Optional[Tuple[str, str, int]]:
    """One ``no_proxy`` entry as (kind, host, port), port 0 for any; None for a blank one.

    The forms curl and Go's ``httpproxy`` take, case-insensitive: ``*`` (every host: kind
    "*"); a network, ``10.0.0.0/8`` or ``fd00::/8`` ("net"); an IP address, IPv6 bare or in
    brackets ("ip": compared as addresses, so ``::1`` is ``0:0::1``); else a host name
    ("name"), which also matches its subdomains on label boundaries (``example.com`` matches
    ``api.example.com``, not ``badexample.com``), with ``.example.com`` and ``*.example.com``
    the same entry. Any but a network may end in ``:port`` (``[::1]:8080`` for IPv6): it then
    matches that port only. Raises ValueError saying what is wrong."""
    entry = entry.strip().lower()
    if entry in ("", "."):
        return None
    if entry == "*":
        return ("*", "", 0)
    if "/" in entry:
        try:
            return ("net", str(ipaddress.ip_network(entry, strict=False)), 0)
        except ValueError:
            raise ValueError("an entry with a / is not a network (10.0.0.0/8, fd00::/8)") from None
    host, port = entry, None
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or not _is_ip(host) or not (rest == "" or rest.startswith(":")):
            raise ValueError("not an IPv6 entry ([::1] or [::1]:8080)")
        port = rest[1:] if rest else None
    elif entry.count(":") == 1:  # host:port (more colons: an IPv6 address, without a port)
        host, _, port = entry.partition(":")
    number = 0
    if port is not None:
        if not (port.isdigit() and port.isascii() and 0 < int(port) < 65536):
            raise ValueError("not a port (1 to 65535)")
        number = int(port)
    address = _address(host)
    if address is not None:
        return ("ip", address.compressed, number)
    if host.startswith("*."):
        host = host[1:]
    host = host.lstrip(".").rstrip(".")
    if not host:
        raise ValueError("no host")
    if "*" in host:
        raise ValueError("a * stands alone (every host) or begins a name (*.example.com)")
    if not host.isascii():  # (an internationalised name: base_url holds it in its ASCII form)
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("not a host name") from None
    if not _NO_PROXY_NAME.match(host):
        raise ValueError("not a host name")
    return ("name", host, number)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The IP address ``host`` is, or None for a name; an IPv4-mapped IPv6 address
    (``::ffff:10.0.0.1``) is the IPv4 address it maps, as Go compares them."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def bypasses_proxy(host: str, port: int, no_proxy: Tuple[str, ...]) -> bool:
    """True if a provider at ``host``:``port`` (the port its scheme implies when the URL has
    none) is reached directly, not through ``upstream_proxy``: a loopback host (127.0.0.0/8,
    ::1, localhost and its subdomains: RFC 6761 6.3), which no egress proxy can reach as this
    machine, or one a ``no_proxy`` entry matches (see :func:`no_proxy_entry`). A host name
    is matched by name entries only, an IP address by address and network entries only: no
    name is resolved (as curl and Go do it). Once per provider, at start."""
    host = host.lower().rstrip(".")
    address = _address(host)
    if is_loopback(host) or host.endswith(".localhost") or (address is not None and address.is_loopback):
        return True
    for entry in no_proxy:
        kind, value, entry_port = no_proxy_entry(entry)  # (already checked: never None here)
        if kind == "*":
            return True
        if entry_port and entry_port != port:
            continue
        if kind == "name":
            if address is None and (host == value or host.endswith("." + value)):
                return True
        elif kind == "net":
            if address is not None and address in ipaddress.ip_network(value):
                return True
        elif address is not None and address == _address(value):
            return True
    return False


def resolve_proxy(p: Dict[str, Any], base_url: str, upstream_proxy: str, no_proxy: Tuple[str, ...],
                  where: Mapping[str, str], key: str) -> str:
    """The egress proxy of one provider: its own ``proxy`` when it has one ("" for a direct
    connection), which applies whatever its host (the user named it for this provider); else
    ``upstream_proxy``, unless :func:`bypasses_proxy`."""
    own = p.get("proxy")
    if own is not None:
        return _validate_proxy(own, where, key)
    parts = urllib.parse.urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not upstream_proxy or bypasses_proxy(parts.hostname or "", port, no_proxy):
        return ""
    return upstream_proxy


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110's token


def validate(merged: Dict[str, Any], where: Mapping[str, str], source: str) -> Config:
    """Check types and values of a merged configuration and freeze it."""
    for key in ("listen", "data_dir", "session_header", "log_level", "fsync", "on_record_error"):
        if not isinstance(merged[key], str):
            raise _fail(where, key, "must be a string")
    try:
        host, _port = parse_listen(merged["listen"])
    except ValueError as exc:  # (the value itself is not repeated: it may come from a $VAR)
        raise _fail(where, "listen", str(exc)) from None
    merged["log_level"] = merged["log_level"].upper()
    if merged["log_level"] not in LOG_LEVELS:
        raise _fail(where, "log_level", "must be one of %s" % ", ".join(LOG_LEVELS))
    if merged["fsync"] not in FSYNC_MODES:
        raise _fail(where, "fsync", "must be one of %s" % ", ".join(FSYNC_MODES))
    if merged["on_record_error"] not in ON_RECORD_ERROR:
        raise _fail(where, "on_record_error", "must be one of %s" % ", ".join(ON_RECORD_ERROR))
    for key in ("record", "rotate_daily", "compress_rotated"):
        if not isinstance(merged[key], bool):
            raise _fail(where, key, "must be true or false")
    ints = {"max_file_size": 1024, "queue_size": 1, "queue_max_bytes": 0, "max_request_body": 0, "capture_max_body": 0,
            "max_sse_event": 1024, "max_connections": 1, "workers": 1}
    for key, minimum in ints.items():
        merged[key] = _number(merged, where, key, int, minimum, maximum=_MAX_WORKERS if key == "workers" else 2 ** 62)
    floats = {"fsync_interval": 0.001, "connect_timeout": 0.001, "response_header_timeout": 0.001,
              "stream_idle_timeout": 0.001, "client_header_timeout": 0.001, "client_idle_timeout": 0.001,
              "shutdown_timeout": 0}
    for key, minimum in floats.items():
        merged[key] = _number(merged, where, key, float, minimum, maximum=_MAX_SECONDS)
    merged["total_timeout"] = _number(merged, where, "total_timeout", float, 0.001, optional=True, maximum=_MAX_SECONDS)
    if not merged["session_header"].strip():
        raise _fail(where, "session_header", "must not be empty")
    if _HEADER_NAME.fullmatch(merged["session_header"]) is None:  # ("X-Session-Id ", "X-Session-Id:")
        raise _fail(where, "session_header", "not a header name (letters, digits and !#$%&'*+-.^_`|~ only)")

    keys = merged["proxy_keys"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _fail(where, "proxy_keys", "must be a list of strings")
    if any(k and not k.strip() for k in keys):
        raise _fail(where, "proxy_keys", "a key must not be blank")
    keys = tuple(k for k in keys if k)
    if not is_loopback(host) and not keys:
        raise _fail(where, "listen", "%s is not a loopback address: set proxy_keys so clients must authenticate" % host)

    upstream_proxy = _validate_proxy(merged["upstream_proxy"], where, "upstream_proxy")
    no_proxy = _no_proxy_entries(merged["no_proxy"], where)

    providers = merged["providers"]
    if not isinstance(providers, list) or not providers:
        raise _fail(where, "providers", "at least one provider is required")
    built = []
    names = set()
    for i, p in enumerate(providers):
        key = "providers[%d]" % i
        if not isinstance(p, dict):
            raise _fail(where, key, "must be an object")
        for k in p:
            if k not in PROVIDER_KEYS:
                raise _fail(where, "%s.%s" % (key, k), "unknown key")
        name = p.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(where, key + ".name", "required string")
        if name in names:
            raise _fail(where, key + ".name", "a provider of that name comes before it")
        names.add(name)
        ptype = p.get("type")
        if ptype not in PROVIDER_TYPES:
            raise _fail(where, key + ".type", "must be one of %s" % ", ".join(PROVIDER_TYPES))
        base_url = _validate_url(p.get("base_url"), where, key + ".base_url")
        if ptype == "azure":
            _check_azure_url(base_url, where, key + ".base_url")
        else:
            _check_version_suffix(base_url, where, key + ".base_url")
        api_key = p.get("api_key", "")
        if api_key is None:
            api_key = ""
        if not isinstance(api_key, str):
            raise _fail(where, key + ".api_key", "must be a string")
        if not _HEADER_VALUE.match(api_key.strip()):
            raise _fail(where, key + ".api_key", "holds a character a header cannot carry (a line end, "
                                                 "a control character, or one outside Latin-1)")
        models = p.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise _fail(where, key + ".models", "must be a list of glob strings")
        ca_file = _validate_ca_file(p, base_url, where, key + ".ca_file", source)
        proxy = resolve_proxy(p, base_url, upstream_proxy, no_proxy, where, key + ".proxy")
        built.append(Provider(name=name, type=ptype, base_url=base_url, api_key=api_key.strip(), models=tuple(models),
                              ca_file=ca_file, proxy=proxy))

    values = {k: merged[k] for k in DEFAULTS if k not in ("providers", "proxy_keys", "upstream_proxy", "no_proxy")}
    return Config(providers=tuple(built), proxy_keys=keys, upstream_proxy=upstream_proxy, no_proxy=no_proxy, source=source,
                  data_dir_origin=where.get("data_dir", source), **values)


def data_dir_error(config: Config, reason: str) -> ConfigError:
    """The one-line error for a ``data_dir`` that cannot be used at start (a file in its way,
    no permission), prefixed by where its value came from as every config error is (see
    :func:`_fail`): ``config.json: data_dir: cannot use ...``, ``$PROXY_LLM_DATA_DIR: data_dir:
    cannot use ...``, ``--data-dir: cannot use ...``. The path is named: it says where to look."""
    return _fail({"data_dir": config.data_dir_origin}, "data_dir", "cannot use %s: %s" % (config.data_dir, reason))


def load_env_expanded(data: Dict[str, Any], env: Mapping[str, str]) -> Dict[str, Any]:
    """Expand every string value of an already-parsed config object (exposed for tests)."""
    return _expand_tree(data, env, "")
