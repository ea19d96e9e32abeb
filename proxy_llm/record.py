"""The record: what a request thread captures, and how the writer thread turns it into lines.

Request threads only fill an :class:`Exchange` with raw bytes, header tuples and timings (cheap
appends). Everything else happens in :meth:`Encoder.encode` on the recorder's writer thread:
decompression, SSE decoding, reassembly, session resolution, redaction and JSON encoding.

A body that is valid JSON goes into the record as its original bytes (newlines, which JSON only
allows as whitespace, become spaces), so big numbers, key order and duplicate keys are kept
exactly and nothing is re-escaped. Any other body is recorded as a string.

Redaction: credential headers and ``?key=``-style query values are replaced by
``[REDACTED:<fingerprint>]`` (an HMAC-SHA256 prefix under a per-data-dir key, so users can tell
keys apart). As a last pass, every credential value the request carried and every configured
provider key is scrubbed from each encoded line, which covers upstream error bodies that echo
the key, streamed events and headers alike.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import random
import re
import threading
import time
import zlib
from collections import OrderedDict
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from . import dialects, notices, reader, sse, wire
from .depth import MAX_NESTING, nests_within, too_deep
from .memo import Memo
from .sniff import model_is_exact, sniff_stream
from .storage import RECORDS, STREAMS, Pieces
from .storage import safe_sid as session_file_id  # the rule lives with the files

log = logging.getLogger("proxy_llm.record")

SCHEMA_VERSION = 1
#: Every field a record line may hold (the README documents each; tests check both ways).
FIELDS = (
    "schema_version", "id", "timestamp", "session_id", "session_source", "provider", "provider_type", "dialect",
    "endpoint", "method", "query", "model", "stream", "status_code", "ended", "duration", "ttft_ms", "error",
    "tokens_used", "request_bytes", "response_bytes", "stream_events", "truncated", "stream_truncated", "reassembly_error",
    "decode_error", "body_encoding", "request_headers", "response_headers", "request_body", "response_body",
)
#: Fields of a line in streams/*.jsonl.
STREAM_FIELDS = ("id", "session_id", "timestamp", "events", "truncated")
SESSION_SOURCES = ("header", "claude_code", "codex", "metadata_user_id", "model", "default")
ENDINGS = reader.ENDINGS

_random_bits = random.getrandbits
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> two digits
_SHIFTS = range(120, -1, -10)
MAX_DECODED = 256 * 1024 * 1024
MEMO_SIZE = 4096  # entries in each of the encoder's memos before it starts again...
MEMO_CHARS = 1 << 22  # ...or characters in its keys and values (4 Mi), roughly counted: see memo.Memo
_HEAD_START = b'{"schema_version":%d,"id":' % SCHEMA_VERSION


def bounded_memo() -> Memo:
    """A memo of the encoder's or of the server's routes, bounded by ``MEMO_SIZE`` and
    ``MEMO_CHARS`` (as they are when it is made)."""
    return Memo(MEMO_SIZE, MEMO_CHARS)


UPLOADS_SIZE = 1024  # Gemini uploads whose start's session UploadSessions remembers...
UPLOADS_CHARS = 1 << 20  # ...and characters of what it keeps of their starts (1 Mi), roughly counted


def upload_key(path: str, query: str) -> str:
    """What names one Gemini upload among the requests to its URL: the URL's ``upload_id=``
    parameter (Google's session id), else the whole path and query."""
    if query.find("upload_id=") >= 0:
        for part in query.split("&"):
            if part.startswith("upload_id=") and len(part) > 10:
                return part
    return path + "?" + query


class UploadSessions:
    """The session of each Gemini upload in progress, for the records of its chunks.

    A resumable upload is a start, then its chunks, each a request to the upload URL the start
    was answered with. The Google Gen AI SDK sends the chunks with none of the client's
    headers: without this, a chunk's record named no session and was in ``default``, away from
    its start's. When the handler gives a client an upload URL (handler.upload_urls) it hands
    the start's session headers here (:meth:`started`), and the encoder of a chunk's record
    that names no session of its own resolves the session from them (:meth:`get`), as it did
    the start's: the same id, the same source, and the start's credentials scrubbed from it.

    Bounded in uploads (``UPLOADS_SIZE``) and in the characters kept (``UPLOADS_CHARS``): the
    oldest upload goes first (an upload is minutes long; a client inventing upload URLs only
    pushes the old ones out). A start that named no session is not kept (its chunks' records
    are in ``default`` either way). Thread-safe: request threads add, the writer reads (and
    request threads too, when they help it: storage.Recorder.submit)."""

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(name.lower() for name in names)  # the headers that name a session
        self.kept = self.names | wire.CREDENTIAL_HEADERS  # what the record's resolution reads
        self.lock = threading.Lock()  # guards entries and chars
        self.entries: "OrderedDict[str, Tuple[List[Tuple[str, str]], str, int]]" = OrderedDict()
        self.chars = 0

    def started(self, path: str, query: str, headers: Sequence[Tuple[str, str]], start_query: str) -> None:
        """An upload's URL (``path``, ``query``: as the client got it) was handed to a client
        whose start carried ``headers`` and ``start_query``: remember what of them names its
        session, and the credentials they carried (which the chunks' records scrub, as the
        start's does)."""
        kept = [(name, value) for name, value in headers if name.lower() in self.kept]
        if not any(name.lower() in self.names for name, _ in kept):
            return
        key = upload_key(path, query)
        chars = len(key) + len(start_query) + sum([len(name) + len(value) for name, value in kept])
        if chars > UPLOADS_CHARS:
            return
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.chars -= old[2]
            while self.entries and (len(self.entries) >= UPLOADS_SIZE or self.chars + chars > UPLOADS_CHARS):
                self.chars -= self.entries.popitem(last=False)[1][2]
            self.entries[key] = (kept, start_query, chars)
            self.chars += chars

    def get(self, path: str, query: str) -> Optional[Tuple[List[Tuple[str, str]], str]]:
        """(the start's session and credential headers, its query) for a request to an upload
        URL (``path``, ``query``), or None when no start the proxy answered named its session."""
        key = upload_key(path, query)
        with self.lock:
            entry = self.entries.get(key)
        return None if entry is None else (entry[0], entry[1])


def new_id(now: Optional[float] = None) -> str:
    """A 26-character ULID: 48 bits of milliseconds, 80 random bits, Crockford base32."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    # Ids must be unique, not secret: the random module is fast and reseeded after fork().
    value = (ms << 80) | _random_bits(80)
    # 130 bits (2 leading zeros) as 13 pairs of base32 digits, most significant first.
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


# (a second's start, the next second's start, its form): one strftime per second. One tuple,
# replaced whole, so that a thread never reads one second's bounds with another's form (request
# threads encode too when the writer is behind: storage.Recorder.submit). The start as a float
# and two comparisons, not int(t) per call; (1.0, 0.0) holds no time.
_second_cache = (1.0, 0.0, "")


def rfc3339(t: float) -> str:
    global _second_cache
    start, end, form = _second_cache
    if start <= t < end:
        return form % ((t - start) * 1e6)  # (%d truncates a float as int() does)
    second = int(t)
    form = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + ".%06dZ"
    if second >= 0:  # (int() is the floor: the second's bounds)
        _second_cache = (float(second), second + 1.0, form)
    return form % ((t - second) * 1e6)


TAIL_MAX = 1 << 20  # bytes of an answer kept past capture_max_body: its last part (Capture.tail)


class Capture:
    """A body kept up to ``limit`` bytes; past it, only the size and a SHA-256 go on, and, with
    ``tail`` (an answer's capture), the last ``TAIL_MAX`` bytes or so: where a stream ends, with
    its usage and its terminal event, which the record's ``tokens_used`` and ``ended`` are read
    from (:func:`_read_past_cut`). ``tail_cut``: chunks before the tail's were dropped (the
    tail does not go on from the kept part).

    ``add`` runs on the request thread for every relayed chunk: two appends and, once the limit
    is passed, a hash update. Arrival times and bytes are two lists rather than one list of
    (time, bytes) pairs: a pair per chunk would be a new object for the cyclic garbage
    collector to count and walk, thousands a second with many streams open.
    """

    __slots__ = ("limit", "times", "chunks", "kept", "size", "sha", "keeps_tail", "tail", "tail_bytes", "tail_cut")

    def __init__(self, limit: int, tail: bool = False):
        self.limit = limit
        self.times: List[float] = []   # ms since the exchange began, one per kept chunk
        self.chunks: List[bytes] = []
        self.kept = 0
        self.size = 0
        self.sha = None
        self.keeps_tail = tail
        self.tail: Optional[Deque[bytes]] = None  # (made once the limit is passed)
        self.tail_bytes = 0
        self.tail_cut = False

    def add(self, t: float, data: bytes) -> None:
        self.size += len(data)
        if self.limit < 0:  # recording off: count only
            return
        rest = data  # (what is past the limit: the tail's)
        if self.sha is None:
            room = self.limit - self.kept
            if len(data) <= room:
                self.times.append(t)
                self.chunks.append(data)
                self.kept += len(data)
                return
            self.sha = hashlib.sha256()
            for part in self.chunks:
                self.sha.update(part)
            if room > 0:
                self.times.append(t)
                self.chunks.append(data[:room])
                self.kept += room
                if self.keeps_tail:  # (the tail goes on from the kept part)
                    rest = data[room:]
        self.sha.update(data)
        if self.keeps_tail:
            self._keep_tail(rest)

    def _keep_tail(self, data: bytes) -> None:
        tail = self.tail
        if tail is None:
            tail = self.tail = collections.deque()
        tail.append(data)
        self.tail_bytes += len(data)
        while self.tail_bytes - len(tail[0]) >= TAIL_MAX:  # (at least TAIL_MAX stay)
            self.tail_bytes -= len(tail.popleft())
            self.tail_cut = True

    @property
    def truncated(self) -> bool:
        return self.sha is not None

    def parts(self) -> List[Tuple[float, bytes]]:
        """The kept chunks as (arrival ms, bytes), in order."""
        return list(zip(self.times, self.chunks))

    def body(self) -> bytes:
        return b"".join(self.chunks)


class Exchange:
    """One request and its response, as captured by the handler. Plain data, no behaviour."""

    __slots__ = (
        "id", "wall_start", "t0", "method", "path", "query", "req_headers", "request", "provider",
        "provider_type", "family", "model", "model_label", "stream", "status", "resp_headers", "response",
        "ended", "error", "ttft", "duration", "endpoint_label", "upstream_sock", "cancelled",
        "client_sock", "client_gone", "timed_out", "upstream_deadline", "upstream_late", "unclaimed",
        "request_cut",
    )

    def __init__(self, method: str, path: str, query: str, req_headers: List[Tuple[str, str]], capture_limit: int,
                 response_limit: Optional[int] = None):
        self.id: Optional[str] = None  # set by assign_id(), once the request is on its way
        self.wall_start = time.time()
        self.t0 = time.perf_counter()
        self.method = method
        self.path = path
        self.query = query
        self.req_headers = req_headers
        self.request = Capture(capture_limit)
        # (record: false keeps the answer only, for the token metrics: see cli.build_server)
        self.response = Capture(capture_limit if response_limit is None else response_limit, tail=True)
        self.provider = None          # config.Provider or None
        self.provider_type: Optional[str] = None
        self.family = "openai"
        self.model: Optional[str] = None
        self.model_label = "other"
        self.stream: Optional[bool] = False  # None: not settled on the request thread
        self.status: Optional[int] = None
        self.resp_headers: List[Tuple[str, str]] = []
        self.ended = "completed"
        self.request_cut = False      # the request body ended early (wire.BodyError: what came is kept)
        self.error: Optional[Dict[str, str]] = None
        self.ttft: Optional[float] = None
        self.duration = 0.0
        self.endpoint_label = "other"
        self.upstream_sock = None     # set while waiting on the upstream (watchdog, shutdown)
        self.client_sock = None       # set while relaying (watchdog)
        self.cancelled = False        # shutdown cut it
        self.client_gone = False      # the watchdog saw the client close
        self.timed_out = False        # total_timeout passed
        # The upstream socket blocks; the watchdog cuts it once perf_counter() passes this
        # (0.0: not waiting on the upstream) and sets upstream_late.
        self.upstream_deadline = 0.0
        self.upstream_late = False
        # Who records the exchange: the first to take this list's item (see claim()).
        self.unclaimed = [True]

    def assign_id(self) -> str:
        """The record id (a ULID of the start time). Made once the upstream has the request:
        until then every microsecond is the client's latency; the wait that follows is not."""
        if self.id is None:
            self.id = new_id(self.wall_start)
        return self.id

    def claim(self) -> bool:
        """True for the first caller only: the one that records the exchange. Its handler, as
        it ends; or the shutdown, for a handler that did not end in time (one still connecting
        to its upstream, which no cut reaches): exactly one record either way. (``list.pop`` is
        one step under the GIL: no lock.)"""
        try:
            return self.unclaimed.pop()
        except IndexError:
            return False

    @property
    def claimed(self) -> bool:
        """Someone took the right to record it (see claim())."""
        return not self.unclaimed

    def capture_request(self, body: bytes) -> None:
        """Keep the request body, once (the handler calls this after the send, which may be
        retried, and again when the request never left)."""
        if body and not self.request.size:
            self.request.add(0.0, body)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000.0

    @property
    def cut(self) -> bool:
        """The watchdog or a shutdown cut the upstream (each sets its reason before cutting)."""
        return self.cancelled or self.client_gone or self.timed_out or self.upstream_late


def captured_bytes(ex: Exchange) -> int:
    """The body bytes a queued exchange holds in memory (the recorder's byte bound)."""
    return ex.request.kept + ex.response.kept + ex.response.tail_bytes




class Binary(bytes):
    """A body that is not UTF-8 text (audio, images, multipart uploads, an undecoded
    compressed body): written to the record in base64, named in ``body_encoding``, so that
    its bytes can be restored exactly."""

    __slots__ = ()


# The decoder of a 2xx answer that is not a stream (see encode): its value only feeds the token
# counts, which are integers, so its numbers with a fraction or an exponent stay their text (a
# str call each) instead of becoming floats. An embeddings answer is mostly such numbers: it
# parses five times faster. The record holds the answer's own bytes either way.
_FLOATS_AS_TEXT = json.JSONDecoder(parse_constant=reader.STRICT_JSON.parse_constant, parse_float=str)


def parse_body(raw: bytes, decoder: json.JSONDecoder = reader.STRICT_JSON) -> Tuple[Any, Optional[bytes]]:
    """Return (value, raw_json). raw_json is the body fit to splice into a JSON line, or None.

    Empty -> (None, None); valid JSON -> (parsed value, bytes without CR/LF); other UTF-8,
    whitespace alone included -> (text, None); bytes that are not UTF-8 -> (:class:`Binary`, None).
    """
    if not raw:
        return None, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Binary(raw), None
    if too_deep(raw):  # (see depth)
        return text, None
    # decoder.decode(text), without its two Python calls and two regex matches for the
    # whitespace: the value JSON's whitespace surrounds, scanned, is all of it or it is no JSON.
    inner = text.strip(" \t\n\r")
    try:
        value, end = decoder.scan_once(inner, 0)  # (no NaN or Infinity: see reader)
    except (StopIteration, ValueError, RecursionError):  # (RecursionError: nested past the
        return text, None  # recursion limit, valid, but text here; StopIteration: no value)
    if end != len(inner):  # (what decode calls "Extra data")
        return text, None
    # find, not in: for bytes, "in" first tries the needle as an int (10 in b"\n") and builds,
    # then drops, a TypeError before it searches (several times the cost of the search here).
    if raw.find(b"\n") >= 0 or raw.find(b"\r") >= 0:
        # Outside strings JSON allows CR/LF only as whitespace, and inside strings not at all.
        raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
    return value, raw.strip()


def accepted_json(raw: bytes) -> Optional[bytes]:
    """A request body a model API accepted (2xx): its bytes ready to splice into a JSON line, or None.

    Parsing a 100 KB request only to prove it is JSON costs more than forwarding it, and even a
    small one costs the writer more than these checks; a model API (chat, messages, responses,
    embeddings, generateContent ...: an endpoint with a dialect) that answered 2xx has parsed
    it already. What is still checked here, cheaply: it is one
    JSON object (``{`` ... ``}``), valid UTF-8, and holds no ``NaN``/``Infinity`` (which lenient
    servers accept and strict readers of the record would not). Anything else returns None and
    the body is parsed as usual.
    """
    body = raw.strip()
    # A one-byte search is memchr-fast, a word search is not (~1 GB/s): look for the word only
    # where its capital letter occurs at all. (A regex alternation is ten times slower still.)
    # (find, not in: see parse_body.)
    if body[:1] != b"{" or body[-1:] != b"}" or (body.find(b"N") >= 0 and body.find(b"NaN") >= 0) or (
            body.find(b"I") >= 0 and body.find(b"Infinity") >= 0):
        return None
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if body.find(b"\n") >= 0 or body.find(b"\r") >= 0:
        body = body.replace(b"\r", b" ").replace(b"\n", b" ")
    return body


_CODINGS = ("gzip", "x-gzip", "deflate")


def _decompress(chunks: List[Tuple[float, bytes]], encoding: str) -> Tuple[List[Tuple[float, bytes]], Optional[str]]:
    """Decode gzip/deflate chunk by chunk (keeping arrival times). Returns (chunks, error);
    ``chunks`` itself (not a copy: Capture.parts() made it) when there is nothing to decode.

    Stacked codings (``gzip, gzip``: applied in that order) are taken off one by one, the last
    first. A coding the standard library cannot decode (br, zstd) leaves the body as it came
    (recorded in base64, and not scrubbed: README, Security)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return chunks, None
    if encoding.find(",") >= 0:
        codings = [c.strip(" \t") for c in encoding.split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if not all(c in _CODINGS for c in codings):
            return chunks, "content-encoding %s not decoded" % encoding
        out: List[Tuple[float, bytes]] = chunks
        for coding in reversed(codings):
            out, error = _decompress(out, coding)
            if error is not None:  # the body as it came, and why
                return chunks, error
        return out, None
    if encoding not in _CODINGS:
        return chunks, "content-encoding %s not decoded" % encoding
    wbits = 47 if encoding != "deflate" else 15  # 47: gzip or zlib header, auto-detected
    out = []
    total = 0
    ended = False  # a member (a whole gzip or zlib stream) was decoded to its end
    try:
        d = zlib.decompressobj(wbits)
        for t, data in chunks:
            while data:
                if d.eof:
                    # Another member after the first (RFC 1952 2.2: a gzip file is a series of
                    # them, and clients decode them all): a new decoder for the bytes left.
                    ended = True
                    d = zlib.decompressobj(wbits)
                piece = d.decompress(data, MAX_DECODED - total)
                total += len(piece)
                if piece:
                    out.append((t, piece))
                if total >= MAX_DECODED:
                    return out, "decoded body exceeds %d bytes" % MAX_DECODED
                data = d.unused_data if d.eof else b""
        tail = d.flush()
        if tail:
            out.append((chunks[-1][0] if chunks else 0.0, tail))
        return out, None
    except zlib.error:
        if ended:  # bytes after the last whole member that are none: ignored, as clients do
            return out, None
        if encoding == "deflate":  # some servers send raw deflate without the zlib header
            try:
                d = zlib.decompressobj(-15)
                data = d.decompress(b"".join(c for _, c in chunks), MAX_DECODED) + d.flush()
                return [(chunks[-1][0], data)], None
            except zlib.error:
                pass
        return chunks, "body could not be decoded (%s)" % encoding


def _body(cap: Capture, encoding: str) -> Tuple[bytes, Optional[str]]:
    """A captured body as one bytes object, decoded per ``encoding``; (body, decode error)."""
    if not encoding:
        return b"".join(cap.chunks), None  # no (time, bytes) pairs needed
    chunks, error = _decompress(cap.parts(), encoding)
    return b"".join([c for _, c in chunks]), error


def _cut_chunks(chunks: List[Tuple[float, bytes]], pairs: Sequence[Tuple[bytes, bytes, int]]) -> List[Tuple[float, bytes]]:
    """A body cut at ``capture_max_body``, as (arrival ms, bytes) chunks, without a tail that
    starts a secret (wire.cut_secret_start); ``chunks`` itself when there is none."""
    body = b"".join([c for _, c in chunks])
    left = len(wire.cut_secret_start(body, pairs))
    if left == len(body):
        return chunks
    out = []
    for t, data in chunks:
        if left <= 0:
            break
        out.append((t, data[:left]))
        left -= len(data)
    return out


def headers_dict(headers: Iterable[Tuple[str, str]], key: bytes, secrets: Optional[List[str]] = None,
                 memo: Optional[Memo] = None) -> Dict[str, str]:
    """Lower-case names -> values (repeats joined with ", "), credentials redacted.

    The credential values found (:func:`wire.header_secrets`: a Basic credential's password
    and a cookie's value too) are appended to ``secrets`` when it is given. ``memo``, when
    given with ``secrets``, remembers each credential header's (redacted value, secrets): a
    client sends the same key with every request.
    """
    out: Dict[str, str] = {}
    secret_names = wire.SECRET_HEADERS
    for name, value in headers:
        lname = name.lower()
        if lname in secret_names:
            if secrets is None:  # (a response's: only redacted)
                value = wire.redact_header(lname, value, key)
            else:
                # (What a value gives is the same under every name but Cookie.)
                mkey = value if lname != "cookie" else ("cookie", value)
                known = memo.get(mkey) if memo is not None else None
                if known is None:
                    known = (wire.redact_header(lname, value, key), wire.header_secrets(lname, value) if value else [])
                    if memo is not None:  # (the secrets are parts of the value)
                        memo.remember(mkey, known, 2 * len(value) + len(known[0]))
                secrets += known[1]
                value = known[0]
        out[lname] = out[lname] + ", " + value if lname in out else value
    return out


def joined_headers(headers: Iterable[Tuple[str, str]], names: Tuple[str, ...]) -> Dict[str, str]:
    """The values of the headers ``names`` (lower-case) that ``headers`` hold, in one pass, each
    with its repeats joined with ", " as :func:`headers_dict` joins them (and nothing redacted:
    none of these is a credential)."""
    found: Dict[str, str] = {}
    for name, value in headers:
        name = name.lower()
        if name in names:
            found[name] = found[name] + ", " + value if name in found else value
    return found


_READ_HEADERS = ("content-type", "content-encoding")  # what reading an answer needs of its head


def answer_error(ex: Exchange, result: Any, value: Any, ended: str,
                 pairs: Sequence[Tuple[bytes, bytes, int]]) -> Optional[Dict[str, Any]]:
    """A record's ``error``: the exchange's own (the proxy's), else the upstream's the dialect
    read in the answer (``result``), else the HTTP status's (its message from the answer's
    ``value``, scrubbed of ``pairs``), else how it ended early; None for a whole exchange."""
    error = ex.error
    if error is None and result is not None and result.error:
        error = result.error
    if error is None and ex.status is not None and ex.status >= 400:
        error = {"type": "http_%d" % ex.status, "message": _error_message(value, pairs) or "HTTP %d" % ex.status}
    if error is None and ended not in ("completed",):
        error = {"type": ended, "message": "the exchange ended early (%s)" % ended}
    return error


_EVENT_STREAM = bounded_memo()  # Content-Type -> is_event_stream


def is_event_stream(content_type: str) -> bool:
    """Whether an answer's Content-Type is SSE's; remembered (an upstream sends the same few)."""
    known = _EVENT_STREAM.get(content_type)
    if known is None:
        known = _EVENT_STREAM.remember(content_type, content_type.split(";", 1)[0].strip().lower()
                                       == "text/event-stream", len(content_type))
    return known


class Encoder:
    """Turns an :class:`Exchange` into ``[(kind, session_file_id, line), ...]`` (writer thread)."""

    def __init__(self, fingerprint_key: bytes, session_header: str, max_sse_event: int,
                 provider_keys: Sequence[str] = (), on_result=None):
        self.key = fingerprint_key
        self.session_header = session_header.lower()
        self.max_sse_event = max_sse_event
        self.provider_keys = [k for k in provider_keys if len(k) >= wire.SCRUB_MIN]
        self.provider_pairs = wire.scrub_pairs(self.provider_keys, fingerprint_key)
        self.on_result = on_result  # callback(exchange, ended, tokens_used or None): token metrics
        self.session_headers = ((self.session_header, "header"), ("x-claude-code-session-id", "claude_code"),
                                ("session_id", "codex"), ("session-id", "codex"))
        self.file_ids = bounded_memo()  # session id -> session_file_id(): the same few recur
        self.credentials = bounded_memo()  # header value -> (redacted, secrets)
        self.header_forms = bounded_memo()  # header names -> their JSON object, %s per value
        self.heads = bounded_memo()  # see encode(): fields session_id ... stream as JSON
        self.scrub_memo = bounded_memo()  # secret -> its scrub triple
        self.paths = bounded_memo()  # request path -> (endpoint, scrub triples): see path_parts()
        # The session of each Gemini upload whose URL the proxy handed out (handler.upload_urls).
        self.uploads = UploadSessions([name for name, _ in self.session_headers])

    def headers_json(self, headers: Dict[str, str]) -> bytes:
        """``headers`` (from :func:`headers_dict`) as a JSON object.

        A provider answers with the same twenty-odd header names every time, and a client sends
        the same names: the object's form is made once per list of names (a ``%s`` for each
        value), and only the values are escaped, by the ``json`` module's C function: about a
        third less than the encoder spends on the same dict.
        """
        names = tuple(headers)
        form = self.header_forms.get(names)
        if form is None:
            form = "{%s}" % ",".join([_encode_text(name).replace("%", "%%") + ":%s" for name in names])
            self.header_forms.remember(names, form, 2 * len(form))
        try:
            return (form % tuple(map(_quote, headers.values()))).encode("utf-8")
        except (UnicodeEncodeError, TypeError):  # a lone surrogate (written escaped), a value not a str
            return _dumps(headers)

    def header_session(self, headers: Dict[str, str]) -> Optional[Tuple[str, str]]:
        """(session id, source) from the request headers (``headers`` lower-cased), or None."""
        for name, source in self.session_headers:
            value = headers.get(name)
            if value:
                return value, source
        return None

    def upload_session(self, ex: Exchange, secrets: List[str]) -> Optional[Tuple[str, str]]:
        """(session id, source) of a request to a Gemini upload URL that names no session of
        its own (a chunk: the SDK sends it with none of the client's headers): its start's, as
        :meth:`header_session` reads it from the start's headers, or None. The credentials the
        start carried join ``secrets``: the id may hold one, which the start's record scrubs."""
        start = self.uploads.get(ex.path, ex.query)
        if start is None:
            return None
        headers, query = start
        start_h = headers_dict(headers, self.key, secrets, self.credentials)
        if query:
            secrets += wire.query_secrets(query)
        return self.header_session(start_h)

    def file_id(self, session_id: str) -> str:
        """:func:`session_file_id`, remembered (it is a regex match, or a hash, per record)."""
        sid = self.file_ids.get(session_id)
        if sid is None:
            sid = self.file_ids.remember(session_id, session_file_id(session_id), len(session_id) + 64)
        return sid

    def scrub_pair(self, secret: str) -> Tuple[bytes, bytes, int]:
        """``wire.scrub_pairs([secret], key)[0]``, remembered."""
        pair = self.scrub_memo.get(secret)
        if pair is None:
            pair = wire.scrub_pairs([secret], self.key)[0]
            self.scrub_memo.remember(secret, pair, len(secret) + len(pair[0]) + len(pair[1]))
        return pair

    def path_parts(self, path: str) -> Tuple[str, List[Tuple[bytes, bytes, int]]]:
        """(the record's ``endpoint``, scrub triples) of a request path, remembered: what
        :func:`wire.path_secrets` finds in it alone (a key a client put in its base URL, which
        no header nor query carries) redacted in the endpoint and scrubbed from the whole line,
        under the fingerprint of the secret (its decoded form's, for a form percent-encoded)."""
        parts = self.paths.get(path)
        if parts is None:
            found = wire.path_secrets(path, self.provider_keys)
            pairs = wire.form_pairs(found, self.key)
            endpoint = wire.redact_path(path, found, self.key)
            parts = self.paths.remember(path, (endpoint, pairs), 3 * len(path) + len(endpoint))
        return parts

    @staticmethod
    def body_session(ex: Exchange, request_value: Any) -> Tuple[str, str]:
        """(session id, source) when no header named one: metadata.user_id, the model, default."""
        if isinstance(request_value, dict):
            metadata = request_value.get("metadata")
            if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
                return metadata["user_id"], "metadata_user_id"
        if ex.model:
            return ex.model, "model"
        return "default", "default"

    def read_answer(self, ex: Exchange, dialect: Any, content_type: str, resp_encoding: str, event_stream: bool,
                    accepted: bool, every: Sequence[Tuple[bytes, bytes, int]]) -> tuple:
        """An answer read as a record and the token metrics read it: (streamed, events,
        stream_truncated, value, raw JSON or None, body, the dialect's result or None, the
        reassembly error, the decoding error, ``ended``: ``upstream_eof`` for a stream that
        ended without its terminal event). ``every``: the scrub triples (a cut body's start)."""
        events: List[Tuple[float, Any]] = []
        stream_truncated = False
        resp_raw = None
        result = None
        reassembly_error = None
        # A stream is what the upstream sent as one: SSE, or Gemini's streamed JSON array. A
        # server that ignores "stream": true and answers with plain JSON is recorded as plain JSON.
        streamed = ex.status is not None and (event_stream or (
            ex.stream and ex.family == "gemini" and accepted))
        # A body cut, at capture_max_body or by the exchange's early end (a connection reset
        # in the middle of an echo of the key), may end with a secret's first characters.
        cut = every if ex.response.sha is not None or ex.ended != "completed" else ()
        if streamed:  # the events keep their arrival times
            resp_chunks, decode_error = _decompress(ex.response.parts(), resp_encoding)
            resp_body = b""  # not used: a stream that fails reassembly is kept from its chunks
            if decode_error is not None:
                # A coding the proxy cannot take off (br, zstd), or a broken one: no event can be
                # told from those bytes (read as events they made junk and an upstream_eof), so
                # the body is kept as a plain answer's is, its bytes as they came (base64).
                streamed = False
                resp_body = b"".join([c for _, c in resp_chunks])
                if cut:
                    resp_body = wire.cut_secret_start(resp_body, cut)
            elif cut:  # (a body cut through a secret: its start goes)
                resp_chunks = _cut_chunks(resp_chunks, cut)
        else:
            resp_body, decode_error = _body(ex.response, resp_encoding)
            if cut:
                resp_body = wire.cut_secret_start(resp_body, cut)
        end_seen = ex.response.sha is None  # (a stream cut at capture_max_body: see below)
        try:
            if streamed:
                events, stream_truncated = dialects.decode_stream(content_type, resp_chunks, self.max_sse_event)
                result = dialect.reassemble([e for _, e in events])
                resp_value = result.response_body
                if (not end_seen and event_stream and ex.response.tail
                        and resp_encoding.strip().lower() in ("", "identity")):  # (as _decompress reads it)
                    # Its usage and terminal event lie past the kept part: read with its last
                    # part (Capture.tail), the kept part's reading keeps its body.
                    try:
                        whole = _read_past_cut(dialect, content_type, events, ex.response, self.max_sse_event)
                    except Exception:  # (a dialect bug: the kept part's reading stands)
                        log.exception("reading the end of record %s failed", ex.id)
                        whole = None
                    if whole is not None and not _dialect_failed(whole):
                        end_seen = True
                        result.tokens_used, result.complete = whole.tokens_used, whole.complete
                        result.error = result.error or whole.error
            else:
                resp_value, resp_raw, result = _read_answer(dialect, resp_body, accepted)
                if accepted and result.error and type(resp_value) in (dict, list):
                    # An error in a 2xx answer (rare) may quote the value: read it with its floats.
                    resp_value, resp_raw, result = _read_answer(dialect, resp_body, False)
                if (accepted and not end_seen and ex.response.tail and not result.tokens_used
                        and not decode_error and resp_encoding.strip().lower() in ("", "identity")):
                    # An answer longer than capture_max_body (a big embeddings batch): its usage,
                    # last, is in the part kept past the cut (Capture.tail).
                    result.tokens_used = _usage_past_cut(dialect, ex.response) or result.tokens_used
        except Exception as exc:  # a dialect bug must not lose the record: keep raw, say why
            log.exception("reassembly failed for record %s", ex.id)
            reassembly_error = "%s: %s" % (type(exc).__name__, exc)
            result = None
        if result is not None and _dialect_failed(result):
            # The dialect caught its own bug: not the upstream's error, and the raw body stays.
            reassembly_error = result.error.get("message") or "reassembly failed"
            result = None
        if reassembly_error is not None:
            if streamed:
                resp_value = b"".join([c for _, c in resp_chunks]).decode("utf-8", "replace")
            else:
                resp_value, resp_raw = parse_body(resp_body)

        if result is not None and result.tokens_used and ex.method != "POST":
            # A stored answer read again (GET /v1/responses/{id}, a background response, a
            # stream resumed): its usage was spent, and counted, by the request that ran it.
            result.tokens_used = None
        ended = ex.ended
        if (ended == "completed" and streamed and result is not None and not result.complete
                and 200 <= (ex.status or 0) < 300 and dialect is not dialects.GENERIC and end_seen):
            # (A stream of an API without a dialect has no terminal event to miss; one cut at
            # capture_max_body, Capture.truncated, is judged by its last part, Capture.tail,
            # when that could be read: otherwise its relay saw it end as the upstream ended it.)
            if result.error:  # it ended on an error event of its own (Anthropic's overloaded_error)
                ended = "upstream_error"
                notices.upstream_failed(ex.provider, ended, "stream ended with an error event")
            else:
                ended = "upstream_eof"
                notices.upstream_failed(ex.provider, ended, "stream ended without its terminal event")
        return (streamed, events, stream_truncated, resp_value, resp_raw, resp_body, result, reassembly_error,
                decode_error, ended)

    def count(self, ex: Exchange) -> List[Tuple[str, str, bytes]]:
        """``record: false``: the exchange counted in the metrics (``on_result``: how it ended,
        and the tokens its answer reports, read as :meth:`encode` reads them), and no line.
        Only the answer was kept (handler.ProxyHandler.proxy): the model is routing's,
        and a stream is what the upstream sent as one."""
        found = joined_headers(ex.resp_headers, _READ_HEADERS)
        content_type = found.get("content-type", "")
        event_stream = is_event_stream(content_type)
        if ex.stream is None:
            ex.stream = event_stream
        accepted = ex.status is not None and 200 <= ex.status < 300
        dialect = dialects.select(ex.provider_type or ex.family, ex.method, ex.path)
        (_, _, _, resp_value, _, _, result, _, _, ended) = self.read_answer(
            ex, dialect, content_type, found.get("content-encoding", ""), event_stream, accepted, ())
        if ex.status == 401 or ex.status == 403:
            self.tell_refused(ex, answer_error(ex, result, resp_value, ended, ()),
                              wire.request_secrets(ex.req_headers, ex.query))
        if self.on_result is not None:
            self.on_result(ex, ended, (result.tokens_used or None) if result is not None else None)
        return []

    def tell_refused(self, ex: Exchange, error: Any, secrets: List[str]) -> None:
        """An upstream's 401 or 403 (``ex.status``), its ``error`` as the record has it, told to the
        operator once in a while (notices.key_refused), none of ``secrets`` (the request's
        credentials) nor the provider keys in the line. Not the proxy's own 401 (a wrong proxy
        key sets ``ex.error`` as errors.Unauthorized)."""
        if ex.error is None or ex.error.get("type") != "authentication_error":
            notices.key_refused(ex.provider, ex.status, error.get("type") if isinstance(error, dict) else None,
                                secrets + self.provider_keys)

    def encode(self, ex: Exchange) -> List[Tuple[str, str, bytes]]:
        key = self.key
        secrets: List[str] = []
        req_h = headers_dict(ex.req_headers, key, secrets, self.credentials)
        session = self.header_session(req_h)
        if session is None and self.uploads.entries and ex.path.startswith("/upload/"):
            session = self.upload_session(ex, secrets)  # (a chunk of an upload: its start's)
        # Every credential the request carried and every provider key (which the client never
        # saw, so only an upstream can echo them) are scrubbed from every part of the record
        # (wire.scrub_json on the whole line), and from the session id that names its file.
        if ex.query:
            secrets += wire.query_secrets(ex.query)
        every = [self.scrub_pair(s) for s in secrets if len(s) >= wire.SCRUB_MIN] + self.provider_pairs
        # A key the path holds (a base URL set wrong): shaped like one, a credential parameter's
        # value, or, percent-encoded, a secret of the exchange (most paths: a memo hit, a memchr).
        endpoint, path_pairs = self.path_parts(ex.path)
        if path_pairs:
            every += path_pairs
        if secrets and ex.path.find("%") >= 0:
            every += wire.form_pairs(wire.encoded_secrets(ex.path, secrets), key)
        resp_h = headers_dict(ex.resp_headers, key)
        req_body, req_decode_error = _body(ex.request, req_h.get("content-encoding", ""))
        # A body cut at capture_max_body (Capture.truncated: its sha is set), or ended early (a
        # client gone mid-body), may be cut through a secret: its start goes too.
        if (ex.request.sha is not None or ex.request_cut) and every:
            req_body = wire.cut_secret_start(req_body, every)
        req_value, req_raw = None, None
        accepted = ex.status is not None and 200 <= ex.status < 300
        dialect = dialects.select(ex.provider_type or ex.family, ex.method, ex.path)
        # Only a model API's 2xx vouches for the body: an endpoint this proxy does not know may
        # ignore a body, and answer 2xx to one that is not JSON at all.
        if accepted and dialect is not dialects.GENERIC and ex.request.sha is None and (  # (not cut)
                session is not None or req_body.find(b'"user_id"') < 0) and model_is_exact(req_body):
            # The model then comes from the routing scan (exact where model_is_exact says so),
            # and "stream", if routing left it open, from sniff_stream below.
            req_raw = accepted_json(req_body)
        if req_raw is None:
            req_value, req_raw = parse_body(req_body)
        if isinstance(req_value, dict):
            model = req_value.get("model")
            if isinstance(model, str):
                if ex.family != "gemini":
                    ex.model = model  # the exact top-level value (routing used a quick scan)
                elif ex.model is None:  # (Gemini names its model in the path, else in the body as
                    # a resource name, "models/<model>", as in cachedContents)
                    ex.model = model[7:] if model.startswith("models/") else model
        session_id, session_source = session or self.body_session(ex, req_value)
        if not session_id.isascii():  # (a metadata.user_id may hold a lone surrogate)
            session_id = _no_lone_surrogates(session_id)
        # (The session's file id is settled once the line is: see below.)

        content_type = resp_h.get("content-type", "")
        event_stream = is_event_stream(content_type)
        if ex.stream is None:  # routing does not look for "stream" (sniff.sniff)
            if isinstance(req_value, dict):
                ex.stream = req_value.get("stream") is True
            elif event_stream:
                ex.stream = True
            else:
                # A 2xx answer that is not a stream almost always means none was asked for:
                # look near the ends only (where the SDKs put the key), not through the body.
                ex.stream = sniff_stream(req_body, whole=not accepted)
        (streamed, events, stream_truncated, resp_value, resp_raw, resp_body, result, reassembly_error, decode_error,
         ended) = self.read_answer(ex, dialect, content_type, resp_h.get("content-encoding", ""), event_stream,
                                   accepted, every)
        error = answer_error(ex, result, resp_value, ended, every)

        # The line is put together from parts, in FIELDS order: the fields that are the same for
        # every record of one client, session, route and model (session_id ... stream) are
        # encoded once and remembered; the rest, a small dict, are encoded per record, and the
        # header objects by headers_json.
        provider = ex.provider.name if ex.provider is not None else None
        stream = bool(ex.stream)
        head_key = (session_id, session_source, provider, ex.provider_type, dialect.name, ex.path, ex.method,
                    ex.query, ex.model, stream)
        head = self.heads.get(head_key)
        if head is None:
            head = _dumps({
                "session_id": session_id,
                "session_source": session_source,
                "provider": provider,
                "provider_type": ex.provider_type,
                "dialect": dialect.name,
                "endpoint": endpoint,
                "method": ex.method,
                "query": wire.redact_query(ex.query, key),
                "model": ex.model,
                "stream": stream,
            })[1:-1]
            self.heads.remember(head_key, head, 2 * len(head))  # (the key's strings are in the head)
        timestamp = rfc3339(ex.wall_start)
        # The fields from status_code to stream_events are put together as the encoder would
        # write their dict (FIELDS order), from a few forms: an integer or a float by the bytes
        # format, tokens_used by a form per list of its names (_tokens_field). The json module's
        # encoder spends more on a dict this small than on its values (28,000 instructions
        # against 12,000), the durations by _rounded. The rare fields after them are encoded as a dict.
        status = ex.status
        ended_json = _ENDED.get(ended) or _dumps(ended)
        duration = _rounded(ex.duration)
        fields = [_OUTCOME % (status, ended_json, duration) if status is not None
                  else _OUTCOME_NO_STATUS % (ended_json, duration)]
        if (streamed or ex.stream) and ex.ttft is not None:
            fields.append(b',"ttft_ms":' + _rounded(ex.ttft))
        if error is not None:
            fields.append(b',"error":' + _dumps(error))
            if ex.status == 401 or ex.status == 403:  # (on this error branch only: see tell_refused)
                self.tell_refused(ex, error, secrets)
        tokens_used = result.tokens_used if result is not None else None
        if tokens_used:
            fields.append(_tokens_field(tokens_used))
        fields.append(b',"request_bytes":%d,"response_bytes":%d' % (ex.request.size, ex.response.size))
        if streamed:
            fields.append(b',"stream_events":%d' % len(events))  # its line in streams/ holds these events
        more: Dict[str, Any] = {}
        if ex.request.sha is not None or ex.response.sha is not None:  # (Capture.truncated, without its call)
            more["truncated"] = {name: {"size": cap.size, "sha256": cap.sha.hexdigest(), "kept": cap.kept}
                                 for name, cap in (("request", ex.request), ("response", ex.response))
                                 if cap.truncated}
        if stream_truncated:
            more["stream_truncated"] = True
        if reassembly_error:
            more["reassembly_error"] = reassembly_error
        if req_decode_error:  # a request body the proxy could not decode: kept as it came
            decode_error = ("request: %s; response: %s" % (req_decode_error, decode_error) if decode_error
                            else "request: " + req_decode_error)
        if decode_error:
            more["decode_error"] = decode_error
        if self.on_result is not None:
            self.on_result(ex, ended, tokens_used or None)

        scrub = wire.scrub
        if (req_raw is None and type(req_value) is Binary) or (resp_raw is None and type(resp_value) is Binary):
            # Scrubbed before the base64, where no secret could be found any more.
            more["body_encoding"] = encoding = {}
            if type(req_value) is Binary:
                req_value = base64.b64encode(scrub(req_value, every)).decode("ascii")
                encoding["request"] = "base64"
            if type(resp_value) is Binary:
                resp_value = base64.b64encode(scrub(resp_value, every)).decode("ascii")
                encoding["response"] = "base64"
        if more:
            fields += (b",", _dumps(more)[1:-1])
        ident = ex.id  # a ULID (letters and digits) needs no escaping
        ident = b'"%s"' % ident.encode("ascii") if ident and ident.isalnum() and ident.isascii() else _dumps(ident)
        front = b"".join((_HEAD_START, ident, b',"timestamp":"', timestamp.encode("ascii"), b'",', head, b",",
                         b"".join(fields), b',"request_headers":', self.headers_json(req_h),
                         b',"response_headers":', self.headers_json(resp_h)))
        # A body nested too deep to load (MAX_NESTING) goes in as its text; so does a rebuilt
        # stream body, as its JSON text.
        if req_raw is not None and not nests_within(req_raw, MAX_NESTING):
            req_raw, req_value = None, req_body.decode("utf-8")
        if resp_raw is not None and not nests_within(resp_raw, MAX_NESTING):
            resp_raw, resp_value = None, resp_body.decode("utf-8")
        req_json = req_raw if req_raw is not None else _dumps(req_value)
        resp_json = resp_raw if resp_raw is not None else _dumps(resp_value)
        if resp_raw is None and type(resp_value) in (dict, list) and not nests_within(resp_json, MAX_NESTING):
            resp_json = _dumps(resp_json.decode("utf-8"))
        parts = (front, b',"request_body":', req_json, b',"response_body":', resp_json, b"}\n")
        # Only a line with a part of PIECES_FROM bytes or more may go as its parts (_as_pieces,
        # which checks that too; asked here of the three parts that can be long, without the call).
        line = whole = (_as_pieces(parts, every) if len(front) >= PIECES_FROM or len(req_json) >= PIECES_FROM
                        or len(resp_json) >= PIECES_FROM else None)
        if line is None:
            whole = b"".join(parts)
            line = _finished(whole, every)
        if line is not whole:
            # The scrub changed the line (_finished gives the same object otherwise): its
            # session_id may have held a secret (a key in the model's place of a Gemini path,
            # the session being the model's), which would name the session's directory and
            # files. It is scrubbed as the line's session_id was (the same redaction).
            raw_id = session_id.encode("utf-8", "surrogatepass")
            scrubbed = wire.scrub(raw_id, every)
            if scrubbed is not raw_id:
                session_id = scrubbed.decode("utf-8", "surrogatepass")
        sid = self.file_id(session_id)
        out = [(RECORDS, sid, line)]
        if streamed:
            if line is not whole:
                # A secret was in the record, maybe only as the stream's events spell it, a
                # piece in each (a model quoting a key token by token): taken out of them too.
                events = _split_secrets_taken(events, every)
            stream_line = _streams_line(ex.id, session_id, timestamp, events, stream_truncated)
            out.append((STREAMS, sid, _finished(stream_line, every)))
        return out


# The fields of every record from status_code to duration: status, ended (JSON), duration.
_OUTCOME = b'"status_code":%d,"ended":%s,"duration":%s'
_OUTCOME_NO_STATUS = b'"status_code":null,"ended":%s,"duration":%s'
_ENDED = {ended: b'"%s"' % ended.encode("ascii") for ended in ENDINGS}
_TOKEN_FORMS: Dict[Tuple[str, ...], bytes] = {}  # tokens_used's names -> its field's form


def _rounded(value: Any) -> bytes:
    """``round(value, 3)`` as the json module writes it (its repr), for a duration in ms.

    A float below 1e9 is written as its ``%.3f`` without the trailing zeros (but the one after
    the point): the same digits, as ``round`` takes them (both are dtoa's correctly rounded
    mode 3), and repr writes that float back as those digits, since a decimal of 15
    significant digits or fewer is the shortest that gives its float. Without ``round``'s
    conversion back and repr's search: about half the instructions (3,500 fewer a record).
    Anything else (an int, huge, NaN) goes the long way."""
    if type(value) is float and -1e9 < value < 1e9:
        text = (b"%.3f" % value).rstrip(b"0")
        return text + b"0" if text[-1] == 46 else text  # (46: "1." is "1.0")
    return b"%a" % round(value, 3)


def _tokens_field(tokens: Dict[str, Any]) -> bytes:
    """``,"tokens_used":{...}`` as the encoder writes it. A dialect's tokens_used is
    dialects.make_usage's: a few known names, each an int (never a bool), for which the field is
    a form per list of names, the values put in by ``%d``; anything else is encoded."""
    values = tuple(tokens.values())
    for value in values:
        if type(value) is not int:
            return b',"tokens_used":' + _dumps(tokens)
    names = tuple(tokens)
    form = _TOKEN_FORMS.get(names)
    if form is None:
        form = b',"tokens_used":{%s}' % b",".join([_dumps(name).replace(b"%", b"%%") + b":%d" for name in names])
        if len(_TOKEN_FORMS) < 256:  # (make_usage's names give a few dozen lists at most)
            _TOKEN_FORMS[names] = form
    return form % values


_EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")  # a blank line, by the line ends one stream uses


def _read_past_cut(dialect: Any, content_type: str, events: List[Tuple[float, Any]], cap: Capture,
                   max_event: int) -> Any:
    """The dialect's reading of an SSE stream longer than capture_max_body: its kept ``events``
    and those of its last part (``cap.tail``), the part between them missing, or None when no
    whole event of the tail can be told. Only the ending is read from it (``tokens_used``,
    ``complete``, an ``error`` event): the usage and the terminal event come last.

    The event the cut split is read whole when the tail goes on from the kept part (its start
    is what follows the kept part's last blank line); a tail whose first chunks were dropped
    (``tail_cut``) is read from its first blank line on. The kept part's unterminated last
    event is skipped by the reassembly, as any is (sse.Event.unterminated)."""
    data = b"".join(cap.tail)
    start = None if cap.tail_cut else _after_last_event(cap.chunks, max_event)
    if start is None:
        first = _event_end(data, last=False)
        if first < 0:
            return None
        data = data[first:]
    else:
        data = start + data
    past, _ = dialects.decode_stream(content_type, [(0.0, data)], max_event)
    return dialect.reassemble([e for _, e in events] + [e for _, e in past])


_USAGE_KEYS = (b'"usage"', b'"usageMetadata"')


def _usage_past_cut(dialect: Any, cap: Capture) -> Optional[Dict[str, Any]]:
    """The token counts of a non-streamed answer cut at capture_max_body, from its last part
    (``cap.tail``): the last ``"usage"`` (``"usageMetadata"``, Gemini's) object there, read as
    the dialect reads a whole answer's. None when the tail holds none that parses."""
    data = b"".join(cap.tail)
    for key in _USAGE_KEYS:
        at = data.rfind(key)
        if at < 0:
            continue
        colon = data.find(b":", at + len(key))
        if colon < 0:
            continue
        try:
            value, _ = _RAW_DECODER.raw_decode(data[colon + 1:].decode("utf-8", "replace").lstrip())
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            found = dialect.from_body({key[1:-1].decode("ascii"): value})
            if not _dialect_failed(found) and found.tokens_used:
                return found.tokens_used
    return None


_RAW_DECODER = json.JSONDecoder()


def _after_last_event(chunks: List[bytes], limit: int) -> Optional[bytes]:
    """The bytes after the last blank line of ``chunks`` joined (all of them when there is
    none), looked for in the last ``limit`` bytes only; None when that is not enough."""
    window: List[bytes] = []
    size = 0
    for chunk in reversed(chunks):
        window.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    data = b"".join(reversed(window))
    end = _event_end(data, last=True)
    if end >= 0:
        return data[end:]
    return data if size < limit else None


def _event_end(data: bytes, last: bool) -> int:
    """Where the first (``last``: the last) blank line of ``data`` ends, -1 when it has none."""
    ends = [i + len(blank) for blank in _EVENT_ENDS for i in ((data.rfind if last else data.find)(blank),) if i >= 0]
    return (max(ends) if last else min(ends)) if ends else -1


def _dialect_failed(result: Any) -> bool:
    """Whether a dialect's result is its own bug caught (dialects.REASSEMBLY_ERROR), not an
    upstream's error."""
    return bool(result.error) and result.error.get("type") == dialects.REASSEMBLY_ERROR


def _streams_line(ident: Optional[str], session_id: str, timestamp: str, events: List[Tuple[float, Any]],
                  truncated: bool) -> bytes:
    """A stream's line in streams/ (STREAM_FIELDS): what ``_dumps`` makes of the dict of those
    fields, each event as its ``Event.to_json`` with its time in ms rounded to the microsecond.

    A stream has hundreds of events, nearly all with only an event name and data: those are put
    together from their JSON strings, not made into a dict each for the encoder (which escapes
    their three keys again every time): a third less. The times are encoded together, as one
    list, and split on its commas (a number has none).
    """
    rounded = [round(t, 3) for t, _ in events]
    try:
        parts = [_EVENT_FORM % (text, "null" if e.event is None else _quote(e.event), _quote(e.data))
                 if e.id is None and e.retry is None and not e.comments and not e.unterminated
                 else _encode_text(e.to_json(t))
                 for t, text, (_, e) in zip(rounded, _encode_text(rounded)[1:-1].split(","), events)]
        return ('{"id":%s,"session_id":%s,"timestamp":%s,"events":[%s],"truncated":%s}\n' % (
            _encode_text(ident), _encode_text(session_id), _encode_text(timestamp), ",".join(parts),
            _encode_text(truncated))).encode("utf-8")
    except (UnicodeEncodeError, TypeError):  # a lone surrogate, written escaped; a field not a str
        return _dumps({
            "id": ident,
            "session_id": session_id,
            "timestamp": timestamp,
            "events": [e.to_json(t) for t, (_, e) in zip(rounded, events)],
            "truncated": truncated,
        }) + b"\n"


_EVENT_FORM = '{"t":%s,"event":%s,"data":%s}'  # an event with no other field, as to_json has it


def _split_secrets_taken(events: List[Tuple[float, Any]],
                         pairs: Sequence[Tuple[bytes, bytes, int]]) -> List[Tuple[float, Any]]:
    """``events`` without the secrets that their strings spell one piece after another: a
    stream's text comes in pieces (a delta's ``content``, ``text``, ``partial_json``), and a
    secret the upstream sends across several is in none of them whole, so no scrub of the
    streams line finds it, while a reader joining the pieces, as the record's body joins them,
    gets it back. The strings of the events' data (JSON) are read in order; where some of them,
    one after another (other strings may come between: ids, the model), are a secret's end of
    one, then its next characters, then the rest, the first piece's part becomes the secret's
    redaction and the others' parts go; those events' data is written again (compact JSON).
    ``events`` itself when none does. Only for a record that held a secret (its body joins the
    pieces): the scrub of its line changed it."""
    secrets = []
    for raw, redaction, _ in pairs:
        try:
            secrets.append((raw.decode("utf-8"), redaction.decode("ascii")))
        except UnicodeDecodeError:
            continue
    parsed: Dict[int, Any] = {}
    leaves: List[Tuple[int, Any, Any, str]] = []  # (event index, container, key, string)
    for i, (_, e) in enumerate(events):
        data = getattr(e, "data", None)
        if not data or data[:1] not in ("{", "["):
            continue
        try:
            value = reader.STRICT_JSON.decode(data)
        except (ValueError, RecursionError):
            continue
        parsed[i] = value
        _string_leaves(i, value, leaves)
    edits: Dict[Tuple[int, int, Any], List[Tuple[int, int, str]]] = {}
    for secret, redaction in secrets:
        size = len(secret)
        first = secret[0]
        states: Dict[int, list] = {}  # characters of the secret spelled so far -> the pieces
        for i, container, key, text in leaves:
            if not text:
                continue
            piece = (i, container, key)
            found = {}
            for k, trail in states.items():
                rest = secret[k:]
                if text.startswith(rest):  # the secret's end: spelled whole
                    for n, (where, a, b) in enumerate(trail + [(piece, 0, len(rest))]):
                        edits.setdefault((where[0], id(where[1]), where[2]), []).append(
                            (a, b, redaction if n == 0 else ""))
                elif rest.startswith(text):
                    found[k + len(text)] = trail + [(piece, 0, len(text))]
            # A start: the string's end is the secret's first characters (not all of them).
            p = text.find(first, max(0, len(text) - size + 1))
            while p >= 0:
                if secret.startswith(text[p:]):
                    found.setdefault(len(text) - p, [(piece, p, len(text))])
                p = text.find(first, p + 1)
            states.update(found)
    if not edits:
        return events
    out = list(events)
    touched = set()
    for i, container, key, text in leaves:
        changes = edits.get((i, id(container), key))
        if not changes:
            continue
        end = len(text)
        for a, b, new in sorted(changes, reverse=True):
            if b <= end:  # (overlapping pieces: the later one only)
                text = text[:a] + new + text[b:]
                end = a
        container[key] = text
        touched.add(i)
    for i in touched:
        t, e = events[i]
        try:
            data = _encode_text(parsed[i])
        except ValueError:  # a number past a float's range (1e400): the event as it came
            continue
        copy = sse.Event(data, e.event, e.id, e.retry, list(e.comments), e.raw)
        copy.unterminated = e.unterminated
        out[i] = (t, copy)
    return out


def _string_leaves(i: int, value: Any, out: List[Tuple[int, Any, Any, str]]) -> None:
    """The strings of a JSON value in their order, as (``i``, their container, their key or
    index, the string)."""
    stack = [(value, None, value)]
    while stack:
        container, key, node = stack.pop()
        if isinstance(node, str):
            out.append((i, container, key, node))
        elif isinstance(node, dict):
            stack.extend(reversed([(node, k, v) for k, v in node.items()]))
        elif isinstance(node, list):
            stack.extend(reversed([(node, k, v) for k, v in enumerate(node)]))


# Any escape that wire.scrub_json's escaped forms (\u00XX, \/) or a surrogate (\uD8xx-\uDFxx)
# begins with: wire._ESCAPE_GATE's and reader._SURROGATE_ESCAPE's searches in one.
_SPECIAL_ESCAPE = re.compile(rb"\\(?:u(?:00[2-7][0-9A-Fa-f]|[dD][89a-fA-F])|/)")


def _finished(line: bytes, pairs: Sequence[Tuple[bytes, bytes, int]]) -> bytes:
    """A record or streams line as it is written: scrubbed of every secret (wire.scrub_json),
    and no lone surrogate escape left for a loader to refuse (reader.lone_surrogates_replaced).
    ``line`` itself, the same object, when neither changed a byte of it.

    A line with backslashes (an agent's request: code and its output, quoted) is searched once
    for the escapes that either pass looks for, not once by each (a regex scan of the whole
    line, several times a memchr's cost): most have none, and then neither search is made
    (the scrub's plain replacements make no escape, so a line they changed is searched anew).
    """
    if _special_escape(line):
        return reader.lone_surrogates_replaced(wire.scrub_json(line, pairs))
    out = wire.scrub_json(line, pairs, escapes=False)
    return out if out is line else reader.lone_surrogates_replaced(out)


def _special_escape(data: bytes) -> bool:
    """Whether ``data`` holds an escape that :func:`_finished`'s passes look for
    (``_SPECIAL_ESCAPE``): a memchr for a backslash, and the regex only from the first."""
    first = data.find(b"\\")
    return first >= 0 and _SPECIAL_ESCAPE.search(data, first) is not None


# A record with a part this long (a body, nearly always) is written as its parts (storage.Pieces),
# not copied into one line first, when nothing in it is for the scrub to change (see _as_pieces).
PIECES_FROM = 16 * 1024


def _as_pieces(parts: Sequence[bytes], pairs: Sequence[Tuple[bytes, bytes, int]]) -> Optional[Pieces]:
    """The line ``parts`` make, in order, as :class:`storage.Pieces`, when one part is
    ``PIECES_FROM`` bytes or more and :func:`_finished` would give their joined line unchanged:
    else None, and the line is joined and scrubbed as any other. (The encoder asks only when
    one of its three parts that can be long, the front or a body, is: the length check below
    is for any other caller.)

    Unchanged is: no part holds an escape that either of ``_finished``'s passes looks for
    (:func:`_special_escape`), and none of ``pairs``' secrets, all plain (``wire.PLAIN``: found
    as their own bytes only when the line has no such escape), occurs in the line. An escape
    cannot span two parts: the encoder's own parts begin with a comma or a brace and end with
    a colon, a brace or the line's end, and a body ends with a whole JSON token (or, let in
    unparsed, with its closing brace: record.accepted_json). A secret can span seams: around
    each, the bytes within a secret's length less one on either side (across short parts too,
    :func:`_seam`) are searched as well.
    """
    if max(map(len, parts)) < PIECES_FROM:
        return None
    longest = 0
    for raw, _, kind in pairs:
        if kind != wire.PLAIN:
            return None
        longest = max(longest, len(raw))
    for part in parts:
        if _special_escape(part):
            return None
    texts = list(parts)
    if longest > 1:
        texts += [_seam(parts, i, longest - 1) for i in range(len(parts) - 1)]
    for raw, _, _ in pairs:
        for text in texts:
            if text.find(raw) >= 0:
                return None
    return Pieces(parts)


def _seam(parts: Sequence[bytes], i: int, reach: int) -> bytes:
    """The ``reach`` bytes of ``parts`` before the end of ``parts[i]`` and the ``reach`` after
    it (fewer at the line's ends), across as many parts as they take: any run of at most
    ``reach + 1`` bytes of the joined line that crosses that seam lies within."""
    before: List[bytes] = []
    left = reach
    j = i
    while left > 0 and j >= 0:
        piece = parts[j][-left:]
        before.append(piece)
        left -= len(piece)
        j -= 1
    after: List[bytes] = []
    left = reach
    j = i + 1
    while left > 0 and j < len(parts):
        piece = parts[j][:left]
        after.append(piece)
        left -= len(piece)
        j += 1
    return b"".join(before[::-1] + after)


def _read_answer(dialect: Any, body: bytes, accepted: bool) -> Tuple[Any, Optional[bytes], Any]:
    """(value, raw_json, the dialect's result) of an answer that is not a stream; a 2xx one
    (``accepted``) is read with its floats as text (``_FLOATS_AS_TEXT``)."""
    value, raw = parse_body(body, _FLOATS_AS_TEXT if accepted else reader.STRICT_JSON)
    return value, raw, dialect.from_body(value if isinstance(value, (dict, list)) else None)


def _no_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate as U+FFFD, as the line will have it
    (reader.lone_surrogates_replaced): the session's file is named after the id the record holds."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _error_message(value: Any, pairs: Sequence[Tuple[bytes, bytes, int]] = ()) -> Optional[str]:
    """The message of an error answer; of a text one, its first 200 characters, scrubbed of
    ``pairs`` (wire.scrub_pairs) before the cut (which would leave the part of a secret the
    scrub of the whole line no longer finds)."""
    if isinstance(value, dict):
        err = value.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(value.get("message"), str):
            return value["message"]
    if isinstance(value, str) and value:
        if len(value) > 200 and pairs:
            value = wire.scrub(value.encode("utf-8", "surrogatepass"), pairs).decode("utf-8", "surrogatepass")
        return value[:200]
    return None


def _compact_encoder(ensure_ascii: bool) -> Callable[[Any], str]:
    """``json.dumps(value, ensure_ascii=..., separators=(",", ":"))`` made once, not per call.

    ``json.dumps`` with arguments builds a new encoder each call, and its ``encode`` builds the
    C encoder again and keeps a dict of the containers seen (to report cycles, which a record,
    built from parsed JSON and plain values, cannot have). On a small record that is a fifth of
    the encoding. The C encoder made once here is used when this interpreter has one that gives
    the same text as the public API on a sample; otherwise the public API, made once.
    """
    public = json.JSONEncoder(ensure_ascii=ensure_ascii, separators=(",", ":"), check_circular=False,
                              allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    quote = json.encoder.c_encode_basestring_ascii if ensure_ascii else json.encoder.c_encode_basestring
    if make is None or quote is None:
        return public.encode
    try:
        # (markers, default, encoder, indent, key_separator, item_separator, sort_keys,
        #  skipkeys, allow_nan): JSONEncoder.iterencode's own call, in every Python since 3.2.
        encoder = make(None, public.default, quote, None, ":", ",", False, False, False)
        join = "".join

        def encode(value: Any) -> str:
            return join(encoder(value, 0))

        sample = {"a": [1, 2.5, -0.0, 10 ** 20, True, None, "\u00e9\u2028\"\\\n"], "b": {}, "c": [], "d": 1e300}
        if encode(sample) != public.encode(sample) or encode("x") != public.encode("x"):
            return public.encode
        return encode
    except Exception:  # an interpreter whose private C encoder differs: the public API
        return public.encode


_encode_text = _compact_encoder(ensure_ascii=False)
_encode_ascii = _compact_encoder(ensure_ascii=True)
# A string as a JSON string, quotes included, non-ASCII kept: what json.dumps writes for it.
_quote = json.encoder.c_encode_basestring or json.encoder.py_encode_basestring


def _dumps(value: Any) -> bytes:
    try:
        return _encode_text(value).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate cannot be UTF-8 encoded; \u-escapes keep it as valid JSON.
        return _encode_ascii(value).encode("ascii")
    except ValueError:
        # A number JSON cannot hold, NaN or Infinity: read from a stream's events (a literal
        # NaN some servers write for a logprob, or 1e400) into a rebuilt body. Written as its
        # name, a string, so that the line stays JSON (and loads: every loader refuses NaN).
        return _dumps(_finite(value))


def _finite(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite as the string JSON's extension
    names it ("NaN", "Infinity", "-Infinity"), in lists and dicts at any depth."""
    if type(value) is float:
        if value != value:
            return "NaN"
        if value in (_INF, -_INF):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


_INF = float("inf")
