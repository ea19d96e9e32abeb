"""Pure HTTP helpers: hop-by-hop filtering, request body reading, chunk framing, redaction.

Nothing here does I/O of its own except :func:`read_body`, which reads from the file object it
is given. This module imports nothing from the package.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import socket
import urllib.parse
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# RFC 9110 section 7.6.1: connection-specific fields are never forwarded. "Proxy-Connection"
# and "Keep-Alive" are the historic ones clients still send.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
))

# Credentials: never written to a record, a stream file or a log line.
# Besides the providers' own, the keys of the gateways a base_url may point at (Azure API
# Management's subscription key, Cloudflare AI Gateway's token, Helicone's and Portkey's keys):
# forwarded as they came, but redacted and scrubbed like the others.
SECRET_HEADERS = frozenset((
    "authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization",
    "cookie", "set-cookie", "x-proxy-key",
    "ocp-apim-subscription-key", "cf-aig-authorization", "helicone-auth", "x-portkey-api-key",
))

# A secret shorter than this is redacted in its header or query parameter, but not scrubbed
# from the rest of a record (nor from a log line's path): it would match ordinary text.
SCRUB_MIN = 8

# Client credential headers replaced when a provider has its own api_key.
CREDENTIAL_HEADERS = frozenset(("authorization", "x-api-key", "api-key", "x-goog-api-key"))

# Query parameters that carry credentials (Gemini's ?key=, and the usual others).
# Each parameter of a query (name=value); a name is a credential's when it is one of these,
# percent-decoded and lower-cased.
# A parameter begins the query or follows "&", ";" or a second "?" (``alt=sse?key=...``: split
# on "&" alone, the key was the value of alt, kept in clear and never scrubbed).
_QUERY_PARAM_RE = re.compile(r"(^|[&;?])([^&;?=]*)=([^&;?]*)")
_QUERY_SECRET_NAMES = frozenset(("key", "api_key", "api-key", "apikey", "access_token", "token"))
_CHUNK_SIZE_RE = re.compile(rb"^([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?\r?\n$")


class BodyError(Exception):
    """The request body cannot be read. ``status`` is the HTTP answer (400, 413); ``partial``,
    the body bytes that did arrive before the connection ended, failed or timed out (the
    record keeps them: chunked framing taken off, at most what the limit allows)."""

    def __init__(self, status: int, message: str, partial: bytes = b"", gone: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.partial = partial
        self.gone = gone  # the client's input ended or was reset: it left mid-body


def end_to_end(headers: Sequence[Tuple[str, str]], drop: Iterable[str] = ()) -> List[Tuple[str, str]]:
    """Return the headers a proxy forwards: hop-by-hop ones and ``drop`` (lower-case) removed.

    Duplicates and order are kept. One pass; a second only when ``Connection`` names headers.
    """
    skip = drop if isinstance(drop, frozenset) and HOP_BY_HOP <= drop else HOP_BY_HOP.union(drop)
    out = []
    named = None
    for name, value in headers:
        lname = name.lower()
        if lname not in skip:
            out.append((name, value))
        elif lname == "connection":
            tokens = {t.strip().lower() for t in value.split(",")} - {"", "close", "keep-alive"}
            if tokens:
                named = tokens if named is None else named | tokens
    if named:
        out = [(n, v) for n, v in out if n.lower() not in named]
    return out


def framing_fields(headers: Iterable[Tuple[str, str]]) -> Tuple[List[str], List[str]]:
    """The values of a request's Transfer-Encoding and Content-Length lines, each in order."""
    te: List[str] = []
    cl: List[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname == "content-length":
            cl.append(value)
        elif lname == "transfer-encoding":
            te.append(value)
    return te, cl


def read_body(rfile: BinaryIO, headers: Iterable[Tuple[str, str]], limit: int,
              ready: Optional[Callable[[], None]] = None, http10: bool = False) -> bytes:
    """Read a request body framed by Content-Length or chunked transfer coding.

    ``headers``: the request's (name, value) pairs. ``ready``, if given, is called once the
    framing is checked and a body is to be read, before the first byte of it is: the moment to
    answer ``Expect: 100-continue`` (a body refused on its stated length is never asked for).

    Raises BodyError(413) past ``limit`` bytes, BodyError(400) on bad framing, including both
    Content-Length and Transfer-Encoding (RFC 9112 section 6.3: a request smuggling vector),
    and a Transfer-Encoding in an HTTP/1.0 request (``http10``; section 6.1: its framing is
    faulty, whatever else it says).
    A connection that closes early raises BodyError(400), a body that stops arriving for the
    socket's timeout BodyError(408).
    """
    te, cl = framing_fields(headers)
    if te:
        if http10:
            raise BodyError(400, "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)")
        if cl:
            raise BodyError(400, "request has both Content-Length and Transfer-Encoding")
        # Stripped of spaces and tabs only: str.strip() would also take \x0b or \x85 off
        # "chunked\x0b", a coding another server in front may not read as chunked.
        codings = [t.strip(" \t").lower() for v in te for t in v.split(",") if t.strip(" \t")]
        if codings != ["chunked"]:
            raise BodyError(400, "unsupported Transfer-Encoding")
        length = -1
    elif not cl:
        return b""
    else:
        value = cl[0].strip()
        # ASCII digits only ("²".isdigit() is true, and int() refuses it), and few of them (int()
        # refuses past 4,300 digits; anything past 19 is over every limit anyway).
        if (len(cl) > 1 and len(set(v.strip() for v in cl)) != 1) or not (
                value.isdigit() and value.isascii() and len(value) <= 19):
            raise BodyError(400, "invalid Content-Length")
        length = int(value)
        if length > limit:
            raise BodyError(413, "request body is %d bytes; the limit is %d" % (length, limit))
        if not length:
            return b""
    if ready is not None:
        ready()
    parts: List[bytes] = []
    try:
        if length < 0:
            _read_chunked(rfile, limit, parts)
        elif _read_into(rfile, length, parts) < length:
            raise BodyError(400, "request body ended after %d of %d bytes" % (sum(map(len, parts)), length),
                            b"".join(parts), gone=True)
    except socket.timeout:
        raise BodyError(408, "timed out reading the request body", b"".join(parts)) from None
    except OSError:  # a reset
        raise BodyError(400, "the connection failed while reading the request body", b"".join(parts),
                        gone=True) from None
    if len(parts) == 1:
        return parts[0] if type(parts[0]) is bytes else bytes(parts[0])
    return b"".join(parts)


READ_MAX = 1 << 20
# Reads shorter than SMALL_READ are gathered into one bytearray of up to GATHER_MAX bytes: a body
# sent in 2-byte chunks (or in tiny TCP segments) was a bytes object per read, some 28 times the
# body's size in memory, 900 MB for a body within the 32 MiB limit (an audit's finding).
SMALL_READ = 4096
GATHER_MAX = 1 << 20


def _read_into(rfile: BinaryIO, n: int, parts: List[bytes]) -> int:
    """Read up to ``n`` bytes, appending them to ``parts`` as they come; the count read (less
    than ``n`` when the stream ended). By ``read1``, not ``read``: a buffered ``read`` that
    fails (a reset, a timeout) drops what it had read, and the record keeps that. At most
    ``READ_MAX`` a call: ``read1`` makes a buffer of the size asked for before each read."""
    got = 0
    while got < n:
        data = rfile.read1(min(n - got, READ_MAX))
        if not data:
            break
        if len(data) < SMALL_READ and parts and len(parts[-1]) < GATHER_MAX:
            last = parts[-1]
            if type(last) is not bytearray:
                last = parts[-1] = bytearray(last)
            last += data
        else:
            parts.append(data)
        got += len(data)
    return got


def _read_chunked(rfile: BinaryIO, limit: int, parts: List[bytes]) -> None:
    """Read a chunked body into ``parts`` (the chunks' data; see :func:`_read_into`)."""
    total = 0
    while True:
        line = rfile.readline(1024)
        match = _CHUNK_SIZE_RE.match(line)
        if not match:
            if not line.endswith(b"\n") and len(line) < 1024:  # the end of input
                raise BodyError(400, "chunked body ended early", b"".join(parts), gone=True)
            raise BodyError(400, "invalid chunk size line", b"".join(parts))
        size = int(match.group(1), 16)
        if size == 0:
            break
        total += size
        if total > limit:
            raise BodyError(413, "request body exceeds the limit of %d bytes" % limit, b"".join(parts))
        if _read_into(rfile, size, parts) != size:
            raise BodyError(400, "truncated chunk", b"".join(parts), gone=True)
        end = rfile.read(2)
        if end != b"\r\n":
            raise BodyError(400, "truncated chunk", b"".join(parts), gone=len(end) < 2)
    # Trailer fields are read and discarded (never forwarded: RFC 9112 7.1.2).
    for _ in range(100):
        line = rfile.readline(8192)
        if line in (b"\r\n", b"\n"):
            return
        if not line.endswith(b"\n"):
            raise BodyError(400, "truncated chunked body", b"".join(parts), gone=len(line) < 8192)
    raise BodyError(400, "too many trailer fields", b"".join(parts))


def chunk(data: bytes) -> bytes:
    """Frame ``data`` as one HTTP/1.1 chunk, ready for a single write."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


_XOR_IPAD = bytes(b ^ 0x36 for b in range(256))
_XOR_OPAD = bytes(b ^ 0x5C for b in range(256))


@functools.lru_cache(maxsize=8)
def _hmac_states(key: bytes) -> Tuple[Any, Any]:
    """HMAC-SHA256's inner and outer hash states after ``key`` (RFC 2104), made once per key."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return hashlib.sha256(key.translate(_XOR_IPAD)), hashlib.sha256(key.translate(_XOR_OPAD))


# The longest secret whose fingerprint is kept (_cached_fingerprint): 1,024 of them kept
# whole, 64 KB each (a header line holds that much), were 64 MB; a longer one is hashed again.
FINGERPRINT_CACHED_CHARS = 512


def fingerprint(secret: str, key: bytes) -> str:
    """A short keyed fingerprint: tells keys apart without revealing them (cached for a secret
    of up to FINGERPRINT_CACHED_CHARS characters: the same few keys come back on every request).

    It is HMAC-SHA256, from the key's two hash states copied (half of what ``hmac.digest``
    costs, which prepares them again for every call): a cookie, new with every response of
    some providers, gets a fingerprint every time.
    """
    if len(secret) <= FINGERPRINT_CACHED_CHARS:
        return _cached_fingerprint(secret, key)
    return _fingerprint(secret, key)


def _fingerprint(secret: str, key: bytes) -> str:
    inner, outer = _hmac_states(key)
    inner = inner.copy()
    inner.update(secret.encode("utf-8", "surrogatepass"))
    outer = outer.copy()
    outer.update(inner.digest())
    return outer.hexdigest()[:8]


_cached_fingerprint = functools.lru_cache(maxsize=1024)(_fingerprint)


def redacted(secret: str, key: bytes) -> str:
    return "[REDACTED:%s]" % fingerprint(secret, key)


_SCHEMES = ("bearer", "basic", "token")


def redact_header(name: str, value: str, key: bytes) -> str:
    """Redact a header value if the header carries a credential; keep the auth scheme."""
    if name.lower() not in SECRET_HEADERS:
        return value
    if value[:6].lower().startswith(_SCHEMES):  # (most values, a key or a cookie, have none)
        parts = value.split(None, 1)  # at any whitespace: "Bearer<TAB>token" is a scheme and its token
        if len(parts) == 2 and parts[0].lower() in _SCHEMES:
            return "%s %s" % (parts[0], redacted(parts[1].strip(), key))
    return redacted(value, key)


def _param_name(name: str) -> str:
    """A query parameter's name as a server reads it: percent-decoded (``%6Bey`` is ``key``),
    ``+`` a space, lower-cased."""
    if name.find("%") >= 0 or name.find("+") >= 0:
        name = urllib.parse.unquote_plus(name)
    return name.lower()


def _query_param(match: "re.Match[str]") -> bool:
    """Whether a ``name=value`` match of ``_QUERY_PARAM_RE`` names a credential parameter
    (:func:`_param_name`)."""
    return _param_name(match.group(2)) in _QUERY_SECRET_NAMES


def redact_query(query: str, key: bytes) -> str:
    """Redact the values of credential parameters (``key=``, ``api_key=`` ...) in a query."""
    if not query:
        return query
    return _QUERY_PARAM_RE.sub(lambda m: "%s%s=%s" % (m.group(1), m.group(2), redacted(m.group(3), key))
                               if _query_param(m) else m.group(0), query)


def secret_value(value: str) -> str:
    """The secret part of a credential header value (the token after a Bearer/Basic scheme)."""
    if value[:6].lower().startswith(_SCHEMES):  # (as redact_header splits it)
        parts = value.split(None, 1)
        if len(parts) == 2 and parts[0].lower() in _SCHEMES:
            return parts[1].strip()
    return value.strip()


def header_secrets(name: str, value: str) -> List[str]:
    """The values to scrub for a credential header (``name`` lower-case, ``value`` not empty):
    its secret part (:func:`secret_value`) and, what an upstream may echo of it alone, for a
    ``Basic`` credential the decoded ``user:password`` and the password, for a ``Cookie`` the
    value of each cookie. (The header itself is redacted whole.)"""
    secret = secret_value(value)
    out = [secret]
    if name == "cookie":
        for part in value.split(";"):
            cookie = part.partition("=")[2].strip()
            if len(cookie) >= 2 and cookie[0] == cookie[-1] == '"':  # (RFC 6265: a value may be quoted)
                cookie = cookie[1:-1]
            if cookie and cookie not in out:
                out.append(cookie)
    elif value[:6].lower().startswith("basic") and value.split(None, 1)[0].lower() == "basic":
        pair = _basic_pair(secret)
        if pair:
            out.append(pair)
            user, _, password = pair.partition(":")
            # Without a password the user name is the secret (a key sent as Basic "<key>:").
            alone = password or user
            if alone and alone not in out:
                out.append(alone)
    elif name in _AUTHORIZATION:
        # Any other scheme (RFC 9110's credentials: a scheme, then a token68 or parameters),
        # "Key <token>" or "Api-Key <token>": its token alone too, which an upstream may echo.
        parts = value.split(None, 1)
        if len(parts) == 2 and _AUTH_SCHEME.match(parts[0]) and parts[0].lower() not in _SCHEMES:
            token = parts[1].strip()
            if token and token not in out:
                out.append(token)
    return out


_AUTHORIZATION = ("authorization", "proxy-authorization")
_AUTH_SCHEME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # RFC 9110's token


def _basic_pair(token: str) -> Optional[str]:
    """The ``user:password`` a Basic credential's token encodes (RFC 7617: base64; the text
    UTF-8, else Latin-1), or None when it is not base64 of a text with a colon."""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except (ValueError, TypeError):  # binascii.Error is a ValueError; a str not ASCII, too
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text if text.find(":") >= 0 else None


def request_secrets(headers: Iterable[Tuple[str, str]], query: str) -> List[str]:
    """Every credential value a request carries, as the recorder collects them for the
    exchange's scrub list: those of each credential header (:func:`header_secrets`), then the
    query's (:func:`query_secrets`)."""
    out: List[str] = []
    for name, value in headers:
        lname = name.lower()
        if value and lname in SECRET_HEADERS:
            out += header_secrets(lname, value)
    return out + query_secrets(query)


# In a path, the value of what looks like a credential parameter: "key=", ";api_key=", and
# "%3Fkey%3D" (a "?" the client percent-encoded): the upstream takes none for a query, so the
# exchange's scrub list has no such value. (Group 1 the name and its "=", group 2 the value.)
_PATH_KEY_PARAM = re.compile(r"(?i)((?:key|api[_-]?key|access_token|token)(?:=|%3D))([^/&;?]*)")
# What is shaped like a provider key: Google's (AIza and 35 more), OpenAI's and Anthropic's
# (sk-...), not inside a longer word: "task-classification-model" holds "sk-" and 20 more.
_KEY_SHAPES = re.compile(r"(?<![0-9A-Za-z_\-])(?:AIza[0-9A-Za-z_\-]{35}|sk-[0-9A-Za-z_\-]{20,})")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_LOGGED = "[REDACTED]"


def path_secrets(path: str, known: Sequence[str] = ()) -> Dict[str, str]:
    """The secrets a request path holds that a scrub of the exchange's own (``known``) as
    they are would miss, as {the form the path holds: the secret}: what is shaped like a
    provider key (``AIza...``, ``sk-...``) or is the value of a credential parameter (``key=``,
    ``%3Fkey%3D``), of :data:`SCRUB_MIN` characters or more, each also where the path holds it
    percent-encoded (then the secret decoded is one more form: what an upstream echoes), and
    each of ``known`` held percent-encoded (:func:`encoded_secrets`). A client may put its key
    in the path: a segment of a base URL set wrong, or after the method.

    The common path (no ``%``, nothing shaped like a key) costs two regex scans; callers that
    see a path again remember the answer."""
    out: Dict[str, str] = {}
    for m in _KEY_SHAPES.finditer(path):
        out[m.group()] = m.group()
    for m in _PATH_KEY_PARAM.finditer(path):
        value = m.group(2)
        if len(value) >= SCRUB_MIN:
            out[value] = urllib.parse.unquote(value, errors="replace") if value.find("%") >= 0 else value
    if path.find("%") >= 0:
        decoded, starts = _percent_decoded(path)
        text = decoded.decode("latin-1")  # (a byte a character: its offsets are the bytes')
        spans = [m.span() for m in _KEY_SHAPES.finditer(text)]
        spans += [m.span(2) for m in _PATH_KEY_PARAM.finditer(text) if m.end(2) - m.start(2) >= SCRUB_MIN]
        for start, end in spans:
            secret = decoded[start:end].decode("utf-8", "replace")
            out[path[starts[start]:starts[end]]] = secret
            out.setdefault(secret, secret)
        out.update(encoded_secrets(path, known, decoded, starts))
    for secret in known:  # (scrubbed as they are by the caller)
        out.pop(secret, None)
    return out


def encoded_secrets(path: str, known: Iterable[str], decoded: Optional[bytes] = None,
                    starts: Optional[List[int]] = None) -> Dict[str, str]:
    """Each of ``known`` (those of :data:`SCRUB_MIN` characters or more) that ``path`` holds
    percent-encoded, some characters or all, as {the form the path holds: the secret}; empty
    for a path without ``%``. (``decoded`` and ``starts``: :func:`_percent_decoded`'s, when
    the caller has them.)"""
    out: Dict[str, str] = {}
    if path.find("%") < 0:
        return out
    if decoded is None or starts is None:
        decoded, starts = _percent_decoded(path)
    for secret in known:
        if len(secret) < SCRUB_MIN:
            continue
        raw = secret.encode("utf-8", "surrogatepass")
        i = decoded.find(raw)
        while i >= 0:
            form = path[starts[i]:starts[i + len(raw)]]
            if form != secret:
                out[form] = secret
            i = decoded.find(raw, i + 1)
    return out


def _percent_decoded(path: str) -> Tuple[bytes, List[int]]:
    """``path`` percent-decoded to bytes (an escape that is not two hex digits kept as it is),
    and where in ``path`` each of its bytes starts (one more: the end), so that a span of the
    decoded bytes gives the span of the path that holds it."""
    out = bytearray()
    starts: List[int] = []
    pos = 0
    for m in _PERCENT_ESCAPE.finditer(path):
        for i in range(pos, m.start()):
            starts.append(i)
        out += path[pos:m.start()].encode("latin-1", "replace")
        starts.append(m.start())
        out.append(int(path[m.start() + 1:m.end()], 16))
        pos = m.end()
    starts.extend(range(pos, len(path) + 1))
    out += path[pos:].encode("latin-1", "replace")
    return bytes(out), starts


def redact_path(path: str, found: Dict[str, str], key: bytes) -> str:
    """``path`` for a record's ``endpoint``: each form of ``found`` (from :func:`path_secrets`)
    replaced by ``[REDACTED:<fingerprint>]`` of its secret, and so is the value of every
    credential parameter, a short one too (as :func:`redact_query` has a query's)."""
    return _path_redacted(path, found, lambda secret: redacted(secret, key))


def endpoint_unredacted(endpoint: str) -> bool:
    """Whether a record's ``endpoint`` still holds what :func:`redact_path` takes out of a path:
    a value shaped like a provider key, or a credential parameter's value, that is not a
    ``[REDACTED...]`` already. Records written before 2026-12-06 kept them (``verify`` reports
    such a record; the value is never shown)."""
    found = {form: secret for form, secret in path_secrets(endpoint).items() if not secret.startswith("[REDACTED")}
    return _path_redacted(endpoint, found, lambda secret: _LOGGED) != endpoint


def query_unredacted(query: str) -> bool:
    """Whether a record's ``query`` holds a credential parameter's value (``key=``, ...) that
    :func:`redact_query` would have redacted and that is not ``[REDACTED...]``."""
    return any(_query_param(m) and m.group(3) and not m.group(3).startswith("[REDACTED")
               for m in _QUERY_PARAM_RE.finditer(query))


def log_path(path: str, secrets: Iterable[str]) -> str:
    """A request path fit for a log line: each of ``secrets`` (those of at least
    :data:`SCRUB_MIN` characters: the exchange's, as :func:`request_secrets` gives them, and
    the provider keys) replaced by ``[REDACTED]``, also where the path holds it
    percent-encoded, and so is what :func:`path_secrets` finds and the value of every
    credential parameter, a short one too."""
    secrets = [s for s in secrets if len(s) >= SCRUB_MIN]
    found = path_secrets(path, secrets)
    for secret in secrets:
        found[secret] = secret
    return _path_redacted(path, found, lambda secret: _LOGGED)


def _path_redacted(path: str, found: Dict[str, str], redaction: Callable[[str], str]) -> str:
    for form in sorted(found, key=len, reverse=True):  # a longer one first: it may hold another
        if path.find(form) >= 0:
            path = path.replace(form, redaction(found[form]))
    if path.find("=") >= 0 or path.find("%") >= 0:  # (a parameter needs one or the other)
        path = _PATH_KEY_PARAM.sub(lambda m: m.group(0) if not m.group(2) or m.group(2).startswith("[REDACTED")
                                   else m.group(1) + redaction(m.group(2)), path)
    return path


def query_secrets(query: str) -> List[str]:
    """The credential values in a query string: each as sent and, when they differ, as the
    upstream reads it (percent-decoded, and with ``+`` as a space), the form it echoes."""
    if not query:
        return []
    out: List[str] = []
    for m in _QUERY_PARAM_RE.finditer(query):
        value = m.group(3)
        if value and _query_param(m):
            out.append(value)
            if value.find("%") >= 0 or value.find("+") >= 0:
                for form in (urllib.parse.unquote(value), urllib.parse.unquote_plus(value)):
                    if form and form not in out:
                        out.append(form)
    return out


_QUERY_SEPARATOR_RE = re.compile(r"([&;?])")


def without_key_param(query: str) -> str:
    """``query`` without Gemini's ``key=`` parameter, for a provider of another API, to which
    that key must never go; the other parameters and their separators as they came, and the
    query itself when it has none. A parameter is read as the scrub reads it (after ``&``,
    ``;`` or a second ``?``; its name by :func:`_param_name`: ``%6Bey=`` is ``key=``). (errors,
    which imports nothing from the package, reads names the same way: has_key_param.)"""
    if query.find("=") < 0:
        return query
    pieces = _QUERY_SEPARATOR_RE.split(query)  # parameter, separator, parameter, ...
    kept: List[str] = []
    for i in range(0, len(pieces), 2):
        part = pieces[i]
        eq = part.find("=")
        if eq >= 0 and _param_name(part[:eq]) == "key":
            continue
        if kept:
            kept.append(pieces[i - 1])
        kept.append(part)
    if len(kept) == len(pieces):
        return query
    return "".join(kept)


# The parameter of the pass an upload URL the proxy hands out carries, with proxy_keys set
# (handler.ProxyHandler.upload_urls): Google's upload URL is a capability of its own, and the
# Google Gen AI SDK sends the file's chunks there with none of the client's headers, its key
# included. The pass lets those requests in without a proxy key, for that URL only.
UPLOAD_PASS = "proxy_llm_upload"


def upload_secret(proxy_keys: Sequence[str]) -> bytes:
    """The key of the passes of upload URLs: made from the proxy keys (every worker has the
    same), so that a pass holds as long as the keys do."""
    return hashlib.sha256(b"proxy_llm upload pass\0" + b"\0".join(
        k.encode("utf-8", "surrogatepass") for k in proxy_keys)).digest()


def upload_pass(secret: bytes, path: str, query: str) -> str:
    """The pass of the upload URL ``path?query`` (32 hex digits of an HMAC-SHA256)."""
    return hmac.new(secret, ("%s?%s" % (path, query)).encode("utf-8", "surrogatepass"),
                    hashlib.sha256).hexdigest()[:32]


def with_upload_pass(secret: bytes, path: str, query: str) -> str:
    """``query`` with the pass of ``path?query`` as its last parameter."""
    return "%s%s%s=%s" % (query, "&" if query else "", UPLOAD_PASS, upload_pass(secret, path, query))


def take_upload_pass(secret: bytes, path: str, query: str) -> Tuple[str, bool]:
    """(``query`` without the pass parameter, whether it held a good pass for ``path`` and the
    rest of ``query``): the pass is the proxy's, never sent on, good or not."""
    if query.find(UPLOAD_PASS) < 0:
        return query, False
    kept: List[str] = []
    passes: List[str] = []
    for part in query.split("&"):
        (passes if part.startswith(UPLOAD_PASS + "=") else kept).append(part)
    if not passes:
        return query, False
    rest = "&".join(kept)
    good = len(passes) == 1 and hmac.compare_digest(passes[0][len(UPLOAD_PASS) + 1:].encode("ascii", "replace"),
                                                    upload_pass(secret, path, rest).encode("ascii"))
    return rest, good


# How a secret can appear in a JSON line (see scrub_json).
PLAIN = 0       # printable ASCII but " and \: as is, or \u00XX / \/ escaped
UNICODE = 1     # not ASCII (a header value's Latin-1): as is, or \u escaped
ESCAPED = 2     # holds ", \ or a control character: only escaped


def _kind(secret: str) -> int:
    if secret.find('"') >= 0 or secret.find("\\") >= 0 or not secret.isprintable():
        return ESCAPED
    return PLAIN if secret.isascii() else UNICODE


def scrub_pairs(secrets: Iterable[str], key: bytes) -> List[Tuple[bytes, bytes, int]]:
    """(secret, its redaction, kind) for each secret, made once for every part of a record that
    is scrubbed: the secret and its redaction as bytes, and how it can appear in a JSON line
    (``PLAIN``, ``UNICODE`` or ``ESCAPED``; see :func:`scrub_json`)."""
    return [(s.encode("utf-8", "surrogatepass"), redacted(s, key).encode("ascii"), _kind(s)) for s in secrets]


def form_pairs(found: Dict[str, str], key: bytes) -> List[Tuple[bytes, bytes, int]]:
    """:func:`scrub_pairs` for ``found``, {a form: the secret it is} (:func:`path_secrets`):
    each form replaced by the redaction of its secret, so that a key percent-encoded in a path
    has the fingerprint of the key."""
    return [(form.encode("utf-8", "surrogatepass"), redacted(secret, key).encode("ascii"), _kind(form))
            for form, secret in found.items()]


def scrub(data: bytes, pairs: Iterable[Tuple[bytes, bytes, int]]) -> bytes:
    """Replace each secret in ``data`` by its redaction (pairs from :func:`scrub_pairs`): the
    bytes as they are (a body that is not text). A JSON line goes through :func:`scrub_json`."""
    for raw, redaction, _ in pairs:
        if data.find(raw) >= 0:  # not "raw in data", which builds and drops a TypeError first
            data = data.replace(raw, redaction)
    return data


def scrub_json(line: bytes, pairs: Sequence[Tuple[bytes, bytes, int]], escapes: bool = True) -> bytes:
    """Replace each secret in the JSON text ``line`` by its redaction, in every form JSON may
    give it: as its own bytes, and escaped (``\\u0073``, ``\\/``, ``\\"``; a few characters or
    all; at any level of JSON text held in a string, such as an event's data in a streams line
    or a tool call's arguments), which a reader of the line decodes back to the secret.

    The common case costs a search per secret and one ``memchr`` for a backslash: a line
    without escapes cannot hold an escaped secret. Only a line holding ``\\u00`` or ``\\/`` escapes
    of a character of some secret, or a secret that is not ``PLAIN``, is searched by
    :func:`_escaped_pattern` (``escapes`` false: the caller's own search found neither in
    ``line``, see record._finished, and this one is not made). A line the replacements made invalid (a secret that is also a
    number in it: ``"created":1234567890``) is scrubbed again, token by token
    (:func:`_scrub_tokens`), so that no record is lost to its redaction. A line holding no
    secret is returned itself, the same object (the recorder tells by that, at no cost, that
    the record's session id held none).
    """
    out = line
    changed = special = False
    for raw, redaction, kind in pairs:
        if kind:
            special = True
            if kind == ESCAPED:  # (its bytes in a line would be JSON's own quotes and escapes)
                continue
        if out.find(raw) >= 0:
            out = out.replace(raw, redaction)
            changed = True
    backslash = out.find(b"\\")  # (memchr: no escape without a backslash)
    # Then one regex search from there settles most lines: no \u00XX escape of a printable
    # character, nor \/ (\\u00XX a level within is one too). A regex with a literal first
    # byte takes half the time of a search for "\\u00" by the bytes module, which steps
    # through the line (70 us over 100 KB).
    # (The plain replacements above make no escape: a redaction holds no backslash.)
    if backslash >= 0 and (special or (escapes and _ESCAPE_GATE.search(out, backslash) is not None)):
        escaped = _escaped_chars(out, backslash)
        if escaped or special:
            out, n = _scrub_escaped(out, pairs, escaped)
            changed = changed or n > 0
    if changed and not _is_json(out):
        return _scrub_tokens(line, pairs)
    return out


# An escape of a printable ASCII character: \u00XX (its hex digits the group), or \/ (no group).
_ESCAPE_GATE = re.compile(rb"\\(?:u00([2-7][0-9A-Fa-f])|/)")


def _escaped_chars(line: bytes, start: int) -> Optional[set]:
    """The printable ASCII characters (as ints) that ``line`` holds \\u00XX-escaped or, for
    ``/``, as ``\\/`` (searched from ``start``, its first backslash); None when none. One
    regex scan (``_ESCAPE_GATE``'s), not a search of the bytes module per form."""
    found = set(_ESCAPE_GATE.findall(line, start))
    if not found:
        return None
    return {int(h, 16) if h else 0x2F for h in found}


def _holds_any(raw: bytes, chars: set) -> bool:
    """Whether the secret ``raw`` holds one of ``chars`` (ints): a memchr each (the line's
    escaped characters are a few; a set of a long secret's bytes would be made per record)."""
    for c in chars:
        if raw.find(c) >= 0:
            return True
    return False


def _scrub_escaped(line: bytes, pairs: Iterable[Tuple[bytes, bytes, int]],
                   escaped: Optional[set]) -> Tuple[bytes, int]:
    """Replace the escaped forms of the secrets that may have one in ``line``: every secret
    that is not ``PLAIN``, and a ``PLAIN`` one holding a character of ``escaped``. (The line, and
    how many were replaced.)"""
    count = 0
    for raw, redaction, kind in pairs:
        if kind == PLAIN and (not escaped or not _holds_any(raw, escaped)):
            continue
        line, n = _sub_escaped(line, raw, redaction, kind == ESCAPED)
        count += n
    return line, count


_SHORT_ESCAPES = {'"': b'"', "/": b"/", "\b": b"b", "\f": b"f", "\n": b"n", "\r": b"r", "\t": b"t"}


def _hex4(code: int) -> bytes:
    """\\u-escape hex digits of ``code``, either case."""
    return b"".join(b"[%c%c]" % (c, c - 32) if c >= 0x61 else bytes((c,)) for c in b"%04x" % code)


def _char_forms(c: str, first: bool, last: bool) -> bytes:
    r"""A regex for ``c`` in JSON text at any level of nesting: itself (never ``"`` nor ``\``,
    which JSON text holds only escaped, nor a control character; the first character after
    an even run of backslashes too, which the match then takes), or escaped: ``\u`` and four
    hex digits in either case, a short escape (``\/``, ``\"``, ``\n`` ...), or for ``\`` an
    even run of backslashes. An escape's backslash is one or more (``\\+``): JSON text held in a
    string has its backslashes doubled (``\\u0073`` in an event's data in a streams line,
    ``\\\\u0073`` a level deeper). These are the forms :func:`_escaped_end` follows, one
    character after another; :func:`_start_pattern` finds with them where a secret may start."""
    code = ord(c)
    forms = []
    if code >= 0x20 and c != '"' and c != "\\":
        forms.append((rb"(?:\\\\)*" if first else b"") + re.escape(c.encode("utf-8", "surrogatepass")))
    if code > 0xFFFF:
        code -= 0x10000
        forms.append(rb"\\+u" + _hex4(0xD800 + (code >> 10)) + rb"\\+u" + _hex4(0xDC00 + (code & 0x3FF)))
    else:
        forms.append(rb"\\+u" + _hex4(code))
    if c in _SHORT_ESCAPES:
        forms.append(rb"\\+" + re.escape(_SHORT_ESCAPES[c]))
    elif c == "\\":
        if not last:  # an even run (the next form takes what it needs of the rest)
            forms.append(rb"(?:\\\\)+")
        else:  # (see _last_backslash_ends)
            forms.append(rb"(?:\\\\)+(?!\\)")
            forms.append(rb"(?:\\\\\\\\)*\\\\\\(?:u[0-9A-Fa-f]{4}|[^\\u])")
            forms.append(rb"(?:\\\\\\\\)+(?=\\[^\\])")
    return b"(?:" + b"|".join(forms) + b")"


# The compiled patterns of _start_pattern, keyed by the characters they find: at most
# STARTS_MAX (full, it starts again), each of two characters at most, so a few KB. (A
# pattern of the whole secret, an alternation group per character, took 35 us a character
# to compile: 0.3 s on the writer thread for a new 8 KB key with each request.)
STARTS_MAX = 1024
START_CHARS = 2  # the characters a start pattern finds (one where a body ends: cut_secret_start)
_starts: Dict[Tuple[bytes, bool], "re.Pattern[bytes]"] = {}


def _char_end(raw: bytes, i: int) -> int:
    """Where the character whose UTF-8 starts at ``raw[i]`` ends."""
    lead = raw[i]
    return i + (1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4)


def _start_pattern(raw: bytes, chars: int) -> "re.Pattern[bytes]":
    """A regex that finds, without taking it, each place where the secret ``raw`` may start in
    JSON text: its first ``chars`` characters in the forms of :func:`_char_forms`, not after a
    backslash (where a form starts in the middle of an escape). Remembered (``_starts``)."""
    head = 0
    for _ in range(chars):
        if head < len(raw):
            head = _char_end(raw, head)
    key = (raw[:head], head == len(raw))
    pattern = _starts.get(key)
    if pattern is None:
        text = key[0].decode("utf-8", "surrogatepass")
        last = len(text) - 1 if key[1] else -1
        forms = b"".join(_char_forms(c, n == 0, n == last) for n, c in enumerate(text))
        pattern = re.compile(rb"(?<!\\)(?=" + forms + b")", re.DOTALL)
        if len(_starts) >= STARTS_MAX:
            _starts.clear()
        _starts[key] = pattern
    return pattern


def _sub_escaped(line: bytes, raw: bytes, redaction: bytes, strict: bool) -> Tuple[bytes, int]:
    """``line`` with each match of :func:`_escaped_end` for the secret ``raw``, leftmost first,
    replaced by ``redaction``, and their count. Only where :func:`_start_pattern` finds the
    secret's first characters is it followed further. ``strict``: the secret is ``ESCAPED``
    (see :func:`_escaped_end`)."""
    starts = _start_pattern(raw, START_CHARS)
    out = []
    pos = 0
    end = len(line)
    m = starts.search(line)
    while m is not None:
        start = m.start()
        stop = _escaped_end(line, raw, start, end, strict, False)
        if stop < 0:
            m = starts.search(line, start + 1)
        else:
            out.append(line[pos:start])
            out.append(redaction)
            pos = stop
            m = starts.search(line, stop)
    if not out:
        return line, 0
    out.append(line[pos:])
    return b"".join(out), len(out) // 2


_RUN = re.compile(rb"\\+")
_UNIT = re.compile(rb"u([0-9A-Fa-f]{4})")
_LOW_UNIT = re.compile(rb"\\+u([Dd][C-Fc-f][0-9A-Fa-f]{2})")
_SHORT_DECODED = {v[0]: k.encode("ascii") for k, v in _SHORT_ESCAPES.items()}
_NOT_ITSELF = re.compile(rb'["\x00-\x1f]')  # what JSON text holds only escaped (with "\")
_U_ESCAPES = re.compile(rb"(?:\\+u[0-9A-Fa-f]{4})+")
_ESCAPES_AT_ONCE = 1024


def _decoded(escapes: bytes) -> bytes:
    """The UTF-8 of what \\u escapes (a match of ``_U_ESCAPES``) stand for: surrogate pairs joined,
    a half alone kept (as :func:`_escapes_at` decodes them one by one, a pair first)."""
    units = _RUN.sub(b"\\\\", escapes).decode("unicode_escape")
    return units.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass").encode(
        "utf-8", "surrogatepass")


def _escapes_at(line: bytes, e: int, end: int) -> List[Tuple[bytes, int]]:
    """What an escape whose backslashes end at ``line[e]`` stands for (the UTF-8 of a
    character), with where it ends: none, one, or for the high half of a surrogate pair followed
    by a low half, the pair's character and the half alone (a secret may hold a lone one)."""
    if e >= end:
        return []
    x = line[e]
    if x != 0x75:  # "u"
        d = _SHORT_DECODED.get(x)
        return [] if d is None else [(d, e + 1)]
    m = _UNIT.match(line, e, end)
    if m is None:
        return []
    code = int(m.group(1), 16)
    one = (chr(code).encode("utf-8", "surrogatepass"), m.end())
    if 0xD800 <= code < 0xDC00:
        low = _LOW_UNIT.match(line, m.end(), end)
        if low is not None:
            pair = 0x10000 + ((code - 0xD800) << 10) + int(low.group(1), 16) - 0xDC00
            return [(chr(pair).encode("utf-8"), low.end()), one]
    return [one]


def _last_backslash_ends(line: bytes, p: int, run: int, end: int) -> List[int]:
    """Where a secret's last character, ``\\``, may end when written by the backslashes
    ``line[p:run]`` (they end there): the run whole when even; when odd (its last backslash
    escapes what follows), either the whole run and that escape, if what the run's pairs make a
    level within is itself an odd run (``\\\\\\"`` is ``\\"`` there: an escaped quote), or all but
    the escape (``\\\\\\\\\\"`` is ``\\\\"`` there: a backslash, and the quote that ends the string)."""
    r = run - p
    if r % 2 == 0:
        return [run]
    if r % 4 == 3:
        if run < end and line[run] != 0x75:
            return [run + 1]
        m = _UNIT.match(line, run, end)
        return [] if m is None else [m.end()]
    return [run - 1] if r >= 5 and run < len(line) else []


def _escaped_end(line: bytes, raw: bytes, start: int, end: int, strict: bool, partial: bool) -> int:
    r"""Where the secret ``raw`` ends in ``line[:end]`` if it starts at ``start`` (not after a
    backslash), written in JSON text at any level, each character in one of the forms of
    :func:`_char_forms`; -1 if it does not. ``strict``: check that what stands for itself holds
    no ``"`` nor control character (a secret that holds one: ``ESCAPED``). ``partial``: not the
    secret whole but a start of it that ``end`` cuts (one character or more, the next cut short
    perhaps: an escape, or the first bytes of its UTF-8): ``end`` if there is one, else -1.

    The characters are followed one after another: a run of the secret's bytes as themselves
    is compared whole (up to the line's next backslash), an escape is decoded. Only a ``\`` of
    the secret leaves a choice (how much of a run of backslashes it takes): those are tried in
    turn, each place once. The work is the length of what matches, whatever the secret's.

    Why cutting a match out leaves the line valid JSON, and the text within its strings too:
    a match never starts right after a backslash, so it starts at the first backslash of a run
    or at a character that follows one that is not a backslash. Either is the start of a token
    at every level: a run of backslashes is a run at every level within (halved, the quote's or
    backslash's own escape apart), and what precedes it ends a token (an escape ends with a
    character that is not a backslash). Within a match every run is taken whole: each escaped
    form starts with all of its run (the form before it ended with a character that is not a
    backslash, or is the even run of a ``\`` that this form continues) and ends with the escape's
    last character, so each is whole tokens at every level; a character as itself follows the
    end of a form, or at the start of the match a run the match takes, even (literal
    backslashes): it is a token of its own. At the outer level the span is therefore whole
    tokens. At a level within, it may end inside a token whose backslash it took: the rest is
    hex digits or a letter, text again, never a quote. A secret that ends with ``\`` is the
    exception (:func:`_last_backslash_ends`): two levels or more within, a string that held
    the secret may be left invalid JSON text (it is never left holding the secret).
    """
    n = len(raw)
    stack = [(start, 0)]
    seen = set()
    reach = 16
    while stack:
        p, i = stack.pop()
        while i < n:
            if p >= end:
                if partial and i:
                    return end
                break
            c = raw[i]
            if line[p] != 0x5C:  # the secret's bytes as themselves, up to the line's next backslash
                if c == 0x5C:
                    break
                stop = min(end, p + n - i)
                q = line.find(b"\\", p, stop)
                if q < 0:
                    q = stop
                k = q - p
                # (Most starts differ at once: their first bytes first, before a copy of k.)
                if not line.startswith(raw[i:i + min(k, 16)], p) or (
                        k > 16 and not line.startswith(raw[i:i + k], p)):
                    break
                if strict and _NOT_ITSELF.search(line, p, q) is not None:
                    break
                p = q
                i += k
                continue
            if partial and i and _PARTIAL_ESCAPE.fullmatch(line, p, end) is not None:
                return end  # (an escape cut short: it may be the next character's)
            if i:  # \u escapes one after another, decoded at once where they leave no choice (no backslash):
                # a few first, twice as many each time they match (most starts differ at once), up
                # to _ESCAPES_AT_ONCE (the regex engine keeps a state for each one it repeats)
                m = _U_ESCAPES.match(line, p, min(end, p + 6 * min(n - i, reach)))
                if m is not None:
                    d = _decoded(m.group())
                    if raw.startswith(d, i) and d.find(b"\\") < 0:
                        p = m.end()
                        i += len(d)
                        reach = min(2 * reach, _ESCAPES_AT_ONCE)
                        continue
            run = _RUN.match(line, p, end).end()
            ways = []
            if i == 0 and c != 0x5C and (run - p) % 2 == 0:
                ways.append((run, 0))  # literal backslashes, then the first character as itself
            for d, e in _escapes_at(line, run, end):
                if raw.startswith(d, i):
                    ways.append((e, i + len(d)))
            if c == 0x5C:
                if i + 1 < n:  # an even part of the run (the next character takes the rest)
                    ways += [(p + 2 * k, i + 1) for k in range((run - p) // 2, 0, -1)]
                else:
                    ways += [(e, n) for e in _last_backslash_ends(line, p, run, end)]
            for way in reversed(ways):  # (the first tried first)
                if way not in seen:
                    seen.add(way)
                    stack.append(way)
            break
        else:
            if not partial:
                return p
    return -1


def cut_secret_start(data: bytes, pairs: Sequence[Tuple[bytes, bytes, int]]) -> bytes:
    r"""``data``, a body cut at ``capture_max_body``, without a tail that is the start of one of
    the secrets (pairs from :func:`scrub_pairs`). A secret the cut went through leaves its
    first characters at the end of the part kept, which no scrub finds: that tail is taken
    off, when it is the secret's first bytes (one or more) or its first characters in the
    forms :func:`scrub_json` finds (JSON-escaped, at any level: ``\u0073k-pr``), an escape cut
    short included; then again for what is left, until its end starts no secret. What is
    left is a prefix of the body still. (A body that is starts of secrets one after the other
    all the way, which only someone who knows them could send, would take a pass per start:
    after ``_CUT_PASSES`` passes nothing of it is kept.)"""
    end = len(data)
    for _ in range(_CUT_PASSES):
        cut = end
        for raw, _, kind in pairs:
            start = _secret_start(data, raw, end, kind)
            if start < cut:
                cut = start
        if cut == end:
            return data if end == len(data) else data[:end]
        end = cut
    return b""


_CUT_PASSES = 64
# How far from the end a secret's start is looked for in its escaped forms, per character of
# the secret (an escape is 6 bytes, 12 for a character outside the BMP, with a backslash more
# at each level of JSON text within a string).
_ESCAPED_REACH = 32
# An escape cut short: a run of backslashes, a "u" and fewer than four hex digits (or a high
# surrogate's escape and the start of its low half's).
_PARTIAL_ESCAPE = re.compile(rb"\\+(?:u[0-9A-Fa-f]{0,4}(?:\\+(?:u[0-9A-Fa-f]{0,3})?)?)?")
_PARTIAL_ESCAPE_AT_END = re.compile(rb"(?<!\\)" + _PARTIAL_ESCAPE.pattern + rb"\Z")


def _secret_start(data: bytes, raw: bytes, end: int, kind: int) -> int:
    """Where a tail of ``data[:end]`` that is the start of the secret ``raw`` (not all of it)
    begins; ``end`` when there is none."""
    start = _bytes_start(data, raw, end)
    reach = max(0, end - _ESCAPED_REACH * len(raw) - 16)
    if data.find(b"\\", reach, end) >= 0:  # (an escaped form has a backslash)
        escaped = _escaped_start(data, raw, reach, end, kind == ESCAPED)
        if escaped < start:
            start = escaped
    return start


def _bytes_start(data: bytes, raw: bytes, end: int) -> int:
    """Where the longest tail of ``data[:end]`` that is the first bytes of ``raw`` (not all of
    it) begins; ``end`` when there is none. A tail of 8 bytes or more starts with the secret's
    first 8: only where those are is one compared (a comparison for each length copied the
    secret's start each time, quadratic: 0.1 s for a 64 KB secret)."""
    anchor = raw[:8]
    s = data.find(anchor, max(0, end - len(raw) + 1), end)
    while s >= 0:
        if raw.startswith(data[s:end]):
            return s
        s = data.find(anchor, s + 1, end)
    for k in range(min(len(anchor) - 1, len(raw) - 1, end), 0, -1):
        if data.endswith(raw[:k], 0, end):
            return end - k
    return end


def _escaped_start(data: bytes, raw: bytes, reach: int, end: int, strict: bool) -> int:
    """:func:`_secret_start` for the forms :func:`scrub_json` finds, in ``data[reach:end]``:
    the secret's characters one by one, each as itself or escaped, up to ``end`` (or to a
    character cut short there: an escape, or the first bytes of its UTF-8)."""
    # The escape of a first character cut short (any escape cut short at the very end: it
    # holds too little to tell which character it was).
    m = _PARTIAL_ESCAPE_AT_END.search(data, max(reach, end - 32), end)
    cut = m.start() if m is not None else end
    for first in _start_pattern(raw, 1).finditer(data, reach, end):  # the earliest start makes the longest tail
        if first.start() >= cut:
            break
        if _escaped_end(data, raw, first.start(), end, strict, True) >= 0:
            return first.start()
    return cut


# Validity only: numbers stay text (no digit limit, no float conversion).
_VALIDATOR = json.JSONDecoder(parse_int=len, parse_float=len)


def _is_json(line: bytes) -> bool:
    # (A record or streams line: what it holds from outside nests at most depth.PARSE_LIMIT deep.)
    try:
        _VALIDATOR.decode(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return True


_STRING_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NUMBER_TOKEN = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _scrub_tokens(line: bytes, pairs: Sequence[Tuple[bytes, bytes, int]]) -> bytes:
    """Scrub a JSON line token by token, for when replacing the secrets' bytes made it invalid:
    each string is decoded, its secrets replaced and, if any was, encoded again (then its
    escaped forms are replaced, as :func:`scrub_json` does); outside the strings, a number that
    holds a secret becomes the redaction as a string. Nothing of a secret is left, and the line
    stays valid JSON."""
    out = []
    pos = 0
    for m in _STRING_TOKEN.finditer(line):
        out.append(_scrub_numbers(line[pos:m.start()], pairs))
        out.append(_scrub_string(m.group(), pairs))
        pos = m.end()
    out.append(_scrub_numbers(line[pos:], pairs))
    return b"".join(out)


def _scrub_numbers(text: bytes, pairs: Sequence[Tuple[bytes, bytes, int]]) -> bytes:
    hits = [(raw, redaction) for raw, redaction, _ in pairs if text.find(raw) >= 0]
    if not hits:
        return text

    def number(m: "re.Match[bytes]") -> bytes:
        for raw, redaction in hits:
            if m.group().find(raw) >= 0:
                return b'"%s"' % redaction
        return m.group()
    return _NUMBER_TOKEN.sub(number, text)


def _scrub_string(token: bytes, pairs: Sequence[Tuple[bytes, bytes, int]]) -> bytes:
    try:
        text = json.loads(token)
    except ValueError:
        text = None
    if text is not None:
        new = text
        for raw, redaction, _ in pairs:
            secret = raw.decode("utf-8", "surrogatepass")
            if new.find(secret) >= 0:
                new = new.replace(secret, redaction.decode("ascii"))
        if new is not text:
            try:
                token = json.dumps(new, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: escaped
                token = json.dumps(new).encode("ascii")
    return _scrub_escaped(token, pairs, _ASCII)[0] if token.find(b"\\") >= 0 else token


_ASCII = frozenset(range(128))


_VISIBLE_ASCII = re.compile(r"[!-~]*\Z")
# A dot segment, between separators as servers read them: "/", and what one decodes or takes for
# one ("%2f", a backslash, "%5c"), a ";" starting path parameters ("..;/": Tomcat, Jetty).
_DOT_SEGMENT = re.compile(r"(?i)(?:^|/|\\|%2f|%5c)(?:\.|%2e){1,2}(?:/|\\|%2f|%5c|;|$)")


def bad_target(path: str, query: str) -> Optional[str]:
    """Why a request target (origin form, split by :func:`split_target`) is refused, or None.

    Only visible ASCII (RFC 9112 3.2: anything else, a space or a control character, would be
    sent upstream in a request line of its own making), no fragment, and no dot segment in the
    path (``/v1/../admin``, ``%2e%2e``, ``..%2f``, ``..\\`` and ``..;/`` too): appended to a
    provider's base URL, with its key, it would reach whatever path the upstream makes of it,
    past the base path.
    """
    if not (_VISIBLE_ASCII.match(path) and _VISIBLE_ASCII.match(query)):
        return "only visible ASCII characters are allowed"
    if path.find("#") >= 0 or query.find("#") >= 0:
        return "a fragment (#) is not part of a request"
    if path.find(".") >= 0 or path.find("%") >= 0:  # most paths have neither: one search each
        if _DOT_SEGMENT.search(path):
            return "dot segments (. and ..) are not allowed in the path"
    return None


_DEFAULT_PORTS = {"http": 80, "https": 443}


def under_base(url: str, scheme: str, host: str, port: int, base_path: str) -> Optional[Tuple[str, str, str]]:
    """Where ``url`` lies under a base URL (``scheme``, ``host`` lower-case without brackets,
    ``port``, ``base_path`` without its last slash, as ``upstream.UpstreamPool`` holds them):
    (the path after the base, the query, the fragment), or None when ``url`` is elsewhere: another
    scheme, host or port, outside the base path, with userinfo, or not a URL at all. The path
    and query are as they came, never decoded."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        url_port = parts.port
    except ValueError:  # a port that is not a number, a bracket that does not close
        return None
    if parts.scheme != scheme or parts.netloc.find("@") >= 0 or (parts.hostname or "") != host:
        return None
    if (url_port if url_port is not None else _DEFAULT_PORTS.get(scheme)) != port:
        return None
    path = parts.path
    if base_path:
        if not path.startswith(base_path) or path[len(base_path):len(base_path) + 1] not in ("", "/"):
            return None
        path = path[len(base_path):]
    return path or "/", parts.query, parts.fragment


# RFC 7239 section 4: forwarded-pair = token "=" value, value = token / quoted-string; pairs
# separated by ";", elements by ",". An unquoted value may hold ":" and brackets (host=a:8443,
# for=[::1]), which the grammar wants quoted but reverse proxies configured by hand send bare.
_FORWARDED_PAIR = re.compile(r'[ \t]*(?:([!#$%&\'*+.^_`|~0-9A-Za-z-]+)=("(?:[^"\\]|\\.)*"|[!#$%&\'*+.^_`|~0-9A-Za-z:\[\]-]*))?'
                             r'[ \t]*(;|,|\Z)')
_QUOTED_PAIR = re.compile(r"\\(.)")


def forwarded_element(value: str) -> Optional[Dict[str, str]]:
    """The parameters of the first element of a ``Forwarded`` field value (RFC 7239: the one
    the proxy nearest the client added), names lower-cased, quoted values unquoted; None when
    that element is not well formed, or names a parameter twice (section 4 forbids it)."""
    params: Dict[str, str] = {}
    pos = 0
    while True:
        m = _FORWARDED_PAIR.match(value, pos)
        if m is None:
            return None
        if m.group(1) is not None:  # (an empty pair, "a=1;;b=2", the grammar allows)
            name, val = m.group(1).lower(), m.group(2)
            if val.startswith('"'):
                val = _QUOTED_PAIR.sub(r"\1", val[1:-1])
            if name in params:
                return None
            params[name] = val
        if m.group(3) != ";":
            return params
        pos = m.end()


def split_target(target: str) -> Tuple[str, str]:
    """Split a request target into (path, query)."""
    path, _, query = target.partition("?")
    return path, query


def header_value(headers: Sequence[Tuple[str, str]], name: str) -> Optional[str]:
    name = name.lower()
    for n, v in headers:
        if n.lower() == name:
            return v
    return None
