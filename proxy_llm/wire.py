"""Pure HTTP helpers: hop-by-hop filtering, request body reading, chunk framing, redaction.

Nothing here does I/O of its own except :func:`read_body`, which reads from the file object it
is given. This module imports nothing from the package.
"""

from __future__ import annotations

import functools
import hashlib
import re
import socket
from typing import Any, BinaryIO, Callable, Iterable, List, Optional, Sequence, Tuple

# RFC 9110 section 7.6.1: connection-specific fields are never forwarded. "Proxy-Connection"
# and "Keep-Alive" are the historic ones clients still send.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
))

# Credentials: never written to a record, a stream file or a log line.
SECRET_HEADERS = frozenset((
    "authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization",
    "cookie", "set-cookie", "x-proxy-key",
))

# Client credential headers replaced when a provider has its own api_key.
CREDENTIAL_HEADERS = frozenset(("authorization", "x-api-key", "api-key", "x-goog-api-key"))

# Query parameters that carry credentials (Gemini's ?key=, and the usual others).
_QUERY_SECRET_RE = re.compile(r"(?i)(^|[&;])(key|api_key|api-key|apikey|access_token|token)=([^&;]*)")
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


def read_body(rfile: BinaryIO, headers: Iterable[Tuple[str, str]], limit: int,
              ready: Optional[Callable[[], None]] = None) -> bytes:
    """Read a request body framed by Content-Length or chunked transfer coding.

    ``headers``: the request's (name, value) pairs. ``ready``, if given, is called once the
    framing is checked and a body is to be read, before the first byte of it is: the moment to
    answer ``Expect: 100-continue`` (a body refused on its stated length is never asked for).

    Raises BodyError(413) past ``limit`` bytes, BodyError(400) on bad framing, including both
    Content-Length and Transfer-Encoding (RFC 9112 section 6.3: a request smuggling vector).
    A connection that closes early raises BodyError(400).
    """
    te: List[str] = []
    cl: List[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname == "content-length":
            cl.append(value)
        elif lname == "transfer-encoding":
            te.append(value)
    if te:
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
        raise BodyError(400, "timed out reading the request body", b"".join(parts)) from None
    except OSError:  # a reset
        raise BodyError(400, "the connection failed while reading the request body", b"".join(parts),
                        gone=True) from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


READ_MAX = 1 << 20


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


@functools.lru_cache(maxsize=1024)
def fingerprint(secret: str, key: bytes) -> str:
    """A short keyed fingerprint: tells keys apart without revealing them (cached: the same
    few keys come back on every request).

    It is HMAC-SHA256, from the key's two hash states copied (half of what ``hmac.digest``
    costs, which prepares them again for every call): a cookie, new with every response of
    some providers, gets a fingerprint every time.
    """
    inner, outer = _hmac_states(key)
    inner = inner.copy()
    inner.update(secret.encode("utf-8", "surrogatepass"))
    outer = outer.copy()
    outer.update(inner.digest())
    return outer.hexdigest()[:8]


def redacted(secret: str, key: bytes) -> str:
    return "[REDACTED:%s]" % fingerprint(secret, key)


def redact_header(name: str, value: str, key: bytes) -> str:
    """Redact a header value if the header carries a credential; keep the auth scheme."""
    if name.lower() not in SECRET_HEADERS:
        return value
    scheme, sep, token = value.partition(" ")
    if sep and scheme.lower() in ("bearer", "basic", "token") and token:
        return "%s %s" % (scheme, redacted(token.strip(), key))
    return redacted(value, key)


def redact_query(query: str, key: bytes) -> str:
    """Redact the values of credential parameters (``key=``, ``api_key=`` ...) in a query."""
    if not query:
        return query
    return _QUERY_SECRET_RE.sub(lambda m: "%s%s=%s" % (m.group(1), m.group(2), redacted(m.group(3), key)), query)


def secret_value(value: str) -> str:
    """The secret part of a credential header value (the token after a Bearer/Basic scheme)."""
    scheme, sep, token = value.partition(" ")
    return token.strip() if sep and scheme.lower() in ("bearer", "basic", "token") else value.strip()


def query_secrets(query: str) -> List[str]:
    """The credential values in a query string."""
    if not query:
        return []
    return [m.group(3) for m in _QUERY_SECRET_RE.finditer(query) if m.group(3)]


def scrub_pairs(secrets: Iterable[str], key: bytes) -> List[Tuple[bytes, bytes]]:
    """(secret, its redaction) as bytes, made once for every part of a record that is scrubbed."""
    return [(s.encode("utf-8", "surrogatepass"), redacted(s, key).encode("ascii")) for s in secrets]


def scrub(data: bytes, pairs: Iterable[Tuple[bytes, bytes]]) -> bytes:
    """Replace each secret in ``data`` by its redaction (pairs from :func:`scrub_pairs`)."""
    for raw, redaction in pairs:
        if data.find(raw) >= 0:  # not "raw in data", which builds and drops a TypeError first
            data = data.replace(raw, redaction)
    return data


_VISIBLE_ASCII = re.compile(r"[!-~]*\Z")
_DOT_SEGMENT = re.compile(r"(?i)(?:^|/)(?:\.|%2e){1,2}(?:/|$)")


def bad_target(path: str, query: str) -> Optional[str]:
    """Why a request target (origin form, split by :func:`split_target`) is refused, or None.

    Only visible ASCII (RFC 9112 3.2: anything else, a space or a control character, would be
    sent upstream in a request line of its own making), no fragment, and no dot segment in the
    path (``/v1/../admin``, ``%2e%2e`` too): appended to a provider's base URL, with its key,
    it would reach whatever path the upstream makes of it, past the base path.
    """
    if not (_VISIBLE_ASCII.match(path) and _VISIBLE_ASCII.match(query)):
        return "only visible ASCII characters are allowed"
    if path.find("#") >= 0 or query.find("#") >= 0:
        return "a fragment (#) is not part of a request"
    if path.find(".") >= 0 or path.find("%") >= 0:  # most paths have neither: one search each
        if _DOT_SEGMENT.search(path):
            return "dot segments (. and ..) are not allowed in the path"
    return None


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
