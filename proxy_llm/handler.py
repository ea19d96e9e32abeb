"""The request handler: routing, forwarding, the relay loop and the capture tee.

For each request under a forwarded prefix (``/v1/``, ``/v1beta/``, Azure OpenAI's ``/openai/``
...: errors.FORWARDED_PREFIXES) the handler reads the body, finds ``model`` and ``stream`` (a
byte scan; a full parse only when the scan is ambiguous), picks a provider, sends the request
upstream on a pooled ``http.client`` connection and relays the response: status and
end-to-end headers as received (but for the upload URL of a Gemini file upload, given the
proxy's origin: upload_urls), then the body as it arrives (``read1``), each piece written to
the client in one ``write`` (re-framed as a chunk when the length is not known in advance). The
relayed bytes are appended to the exchange's capture; all parsing happens later on the
recorder's thread. ``/health`` and ``/metrics`` are answered locally.
"""

from __future__ import annotations

import hmac
import http.client
import io
import json
import logging
import re
import socket
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import List, Optional, Tuple

from . import errors, notices, wire
from .errors import ProxyError
from .metrics import status_class
from .record import Exchange, is_event_stream, joined_headers
from .sniff import model_elsewhere, sniff
from . import headers as headers_mod
from .headers import StrictMessage, message, strict_fields, take_fields
from .upstream import (TRANSFER_CODINGS, EgressProxyError, Response, TransferCodingError, UpstreamPool, authority,
                       connect, decoded)

log = logging.getLogger("proxy_llm.handler")

# The request line every client sends in practice: a method, a target without blanks or
# controls, HTTP/1.0 or HTTP/1.1. ProxyHandler.parse_request takes it at a fraction of the
# standard library's cost; any other line goes to the standard parser.
_REQUEST_LINE = re.compile(rb"([A-Z]{1,20}) ([!-~]+) HTTP/1\.([01])\r?\n")
_NO_MATCH = (None, None)  # a model no provider's globs match (cached like a match)
_GEMINI_MODEL_RE = re.compile(r"/models/([^/:]+):([A-Za-z]+)$")
_GEMINI_LABEL_RE = re.compile(r"(/v1beta|/v1alpha|/v1)/models/[^/:]+:([A-Za-z]+)\Z")
_FORWARDED_TEXT = ", ".join(errors.FORWARDED)  # (the 404's message)
# Azure OpenAI's deployment paths: /openai/deployments/<deployment>/chat/completions, ...
_AZURE_DEPLOYMENT_RE = re.compile(r"/openai/deployments/([^/]+)(/.*)\Z")
# A Host header fit to be the authority of a URL the proxy hands out (ProxyHandler.client_origin).
_AUTHORITY_RE = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")

KNOWN_ENDPOINTS = errors.OPENAI_PATHS | frozenset((  # (OpenAI's own, as under Azure's /openai/)
    "/v1/messages", "/v1/messages/count_tokens", "/v1/models",
    # Gemini's file uploads: the start and each chunk (the session is in the query).
    "/upload/v1/files", "/upload/v1beta/files", "/upload/v1alpha/files",
))
GEMINI_METHODS = errors.GEMINI_METHODS
# Request headers never forwarded, besides the hop-by-hop ones: the proxy sets Host and
# Content-Length itself, has already answered Expect, and narrows Accept-Encoding.
DROP_REQUEST = frozenset(("host", "content-length", "expect", "accept-encoding", "x-proxy-key"))
DROP_RESPONSE = frozenset(("content-length",))
_DROP = wire.HOP_BY_HOP | DROP_REQUEST
_DROP_WITH_CREDENTIALS = _DROP | wire.CREDENTIAL_HEADERS
# The credential headers of one API that a provider of another type never gets, even when the
# client's credentials pass through (no api_key): Anthropic's x-api-key, Gemini's
# x-goog-api-key, Azure's api-key (which Azure OpenAI and Anthropic on Azure take, Gemini not).
# Dropped, not refused: a provider that needs a credential answers without one as it would, and
# one that needs none (a local server speaking the Messages API) still works. Authorization is
# every API's header: only a token shaped like another API's key goes (foreign_authorization).
FOREIGN_CREDENTIALS = {"openai": ("x-api-key", "x-goog-api-key"), "anthropic": ("x-goog-api-key",),
                       "gemini": ("x-api-key", "api-key"), "azure": ("x-api-key", "x-goog-api-key")}
_DROP_FOREIGN = {t: _DROP | frozenset(names) for t, names in FOREIGN_CREDENTIALS.items()}
# The headers a client may present its proxy key in (check_proxy_key), in the order they are
# tried: its own, then where each SDK puts its key. The one that carried it is not forwarded.
PROXY_KEY_HEADERS = ("x-proxy-key", "authorization", "x-api-key", "api-key", "x-goog-api-key")
# What a provider without an api_key is not sent, by (its type, the header that carried the
# proxy key: x-proxy-key, always dropped, when none did), and the same with Authorization too
# (a token shaped like another API's key: foreign_authorization).
_DROP_FOREIGN_AND = {(t, name): drop | {name} for t, drop in _DROP_FOREIGN.items() for name in PROXY_KEY_HEADERS}
_DROP_FOREIGN_AND_AUTHORIZATION = {key: drop | {"authorization"} for key, drop in _DROP_FOREIGN_AND.items()}
# The key shapes of the APIs that have one of their own, as a Bearer token: Anthropic's keys and
# OAuth tokens (sk-ant-api03-, sk-ant-oat01-), Google's keys (AIza). OpenAI's sk- is everyone's.
_KEY_OWNERS = (("sk-ant-", "anthropic"), ("AIza", "gemini"))
DECODABLE = frozenset(("gzip", "x-gzip", "deflate", "identity"))
SMALL_BODY = 256 * 1024
EMPTY_LINES_MAX = 16  # empty lines skipped before a request line (handler.parse_request)


def endpoint_label(path: str) -> str:
    """A bounded metric label for a path: one of a fixed set of endpoint shapes, else "other".
    Nothing of the path itself but what a shape fixes: a segment before ``/models/`` (a key
    a client put in its base URL) would be a label of its own, on the metrics page."""
    if path in KNOWN_ENDPOINTS:
        return path
    m = _GEMINI_LABEL_RE.match(path)
    if m and m.group(2) in GEMINI_METHODS:
        return "%s/models/*:%s" % (m.group(1), m.group(2))
    if path.startswith("/v1/models/"):
        return "/v1/models/*"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/*"
    if path.startswith("/openai/"):
        return _azure_label(path)
    return "other"


def _azure_label(path: str) -> str:
    """An Azure OpenAI path's label: ``/openai/deployments/*`` (the deployment a client names
    is not a label of its own) or ``/openai``, then the OpenAI endpoint it is, else "other".
    The endpoint is under ``/v1`` in Azure's v1 API (``/openai/v1/responses``), and without it
    in the paths the ``AzureOpenAI`` client sends (``/openai/responses?api-version=...``)."""
    m = _AZURE_DEPLOYMENT_RE.match(path)
    rest = "/v1" + m.group(2) if m else path[len("/openai"):]
    if not m and not rest.startswith("/v1/"):
        rest = "/v1" + rest
    if rest not in KNOWN_ENDPOINTS and rest not in errors.OPENAI_PATHS:
        return "other"
    return ("/openai/deployments/*" + m.group(2)) if m else path


LOCAL_PATHS = ("/health", "/metrics")  # answered by the proxy itself
LOCAL_QUERIES = tuple(path + "?" for path in LOCAL_PATHS)  # the same, with a query (a probe's cache buster)


def forwarded_origin(headers: List[Tuple[str, str]]) -> Tuple[Optional[str], Optional[str]]:
    """(scheme, host[:port]) of the request a reverse proxy in front of this one received, as
    the request's forwarding fields give them, each None when none does: ``Forwarded``'s
    ``proto=`` and ``host=`` (RFC 7239, its first element: the proxy nearest the client), else
    the first value of ``X-Forwarded-Proto`` and of ``X-Forwarded-Host``. A value is taken only
    when it is fit for a URL the proxy hands out: ``http`` or ``https``; a plain ``host[:port]``
    (no path, userinfo, blanks or controls); a field that holds neither is ignored.

    Only the upload URL the proxy gives a client reads them (ProxyHandler.upload_urls): behind
    a proxy that terminates TLS, the client reaches this one over https, on another origin. The
    fields themselves are forwarded upstream as any other."""
    scheme = host = None
    value = wire.header_value(headers, "forwarded")
    if value is not None:
        params = wire.forwarded_element(value)
        if params is not None:
            scheme, host = _scheme(params.get("proto")), _authority(params.get("host"))
    if scheme is None:
        value = wire.header_value(headers, "x-forwarded-proto")
        scheme = _scheme(value.split(",", 1)[0]) if value is not None else None
    if host is None:
        value = wire.header_value(headers, "x-forwarded-host")
        host = _authority(value.split(",", 1)[0]) if value is not None else None
    return scheme, host


def _scheme(value: Optional[str]) -> Optional[str]:
    """``value`` as a scheme of a URL the proxy hands out (http or https), else None."""
    value = value.strip(" \t").lower() if value is not None else None
    return value if value in ("http", "https") else None


def _authority(value: Optional[str]) -> Optional[str]:
    """``value`` when it is a plain ``host[:port]`` (the port at most 65535), else None."""
    if value is None:
        return None
    value = value.strip(" \t")
    if not _AUTHORITY_RE.match(value):
        return None
    port = value.rpartition(":")[2] if not value.endswith("]") else ""
    return value if not port.isdigit() or int(port) <= 65535 else None


def narrow_accept_encoding(value: Optional[str]) -> Optional[str]:
    """Keep only the codings the recorder can decode (gzip, deflate, identity)."""
    if value is None:
        return None
    kept = [part.strip() for part in value.split(",")
            if part.strip() and part.split(";")[0].strip().lower() in DECODABLE]
    return ", ".join(kept) if kept else "identity"


class ClientClock:
    """The time limits on one client connection, kept by the server's watchdog.

    The client socket blocks: a socket timeout would make every receive and send two system
    calls (a ``poll`` first), each handing the GIL over. Instead, whoever waits on the client
    sets ``due`` (a ``time.perf_counter`` deadline) for as long as it waits, and the watchdog
    (``ProxyServer.watch_once``) shuts the socket down once ``due`` has passed and sets ``late``:
    a read then ends (SHUT_RD; the handler can still answer), a write fails (SHUT_RDWR).

    Each wait for request bytes is bounded by ``idle`` (client_idle_timeout); while
    ``header_deadline`` is set (from the accept, or on a kept-alive connection from the first
    byte of a request, until its headers are parsed)
    the total is bounded too, so a client dribbling header bytes cannot hold a thread past
    client_header_timeout. Each write is bounded by ``idle`` as well: a client that stops
    reading is let go, but not one reading slowly (``probe``, ``more_for``, ``more_until``: the
    watchdog's look at the bytes it has not taken yet, server._still_reading).

    ``stopped``: the shutdown let go of the client (``ProxyServer.cut_waiting_clients``), so a
    read or write that fails from then on is the proxy's stop, not the client's abort.
    """

    __slots__ = ("sock", "idle", "due", "how", "late", "header_deadline", "stopped", "probe", "more_for",
                 "more_until")

    def __init__(self, sock: socket.socket, idle: float):
        self.sock: Optional[socket.socket] = sock  # None once the handler let go of it
        self.idle = idle
        self.due = 0.0
        self.how = socket.SHUT_RD
        self.late = False
        self.header_deadline: Optional[float] = None
        self.stopped = False
        # The watchdog's: (due, unsent bytes) at its last look at a slow write, and the time it
        # gave that write (due more_for) past its due, its client still reading (server.py).
        self.probe: Optional[Tuple[float, int]] = None
        self.more_for = 0.0
        self.more_until = 0.0


class _ClientReader(io.RawIOBase):
    """The client socket as a raw stream, each wait bounded by the :class:`ClientClock`."""

    def __init__(self, clock: ClientClock):
        super().__init__()
        self.clock = clock
        self.recv_into = clock.sock.recv_into

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        clock = self.clock
        if clock.late:
            raise socket.timeout("client timed out")
        due = time.perf_counter() + clock.idle
        header_deadline = clock.header_deadline
        if header_deadline is not None and header_deadline < due:
            if header_deadline <= time.perf_counter():
                raise socket.timeout("client_header_timeout passed")
            due = header_deadline
        clock.how = socket.SHUT_RD
        clock.due = due
        try:
            n = self.recv_into(buf)
        finally:
            clock.due = 0.0
        if not n and clock.late:  # the end of input was the watchdog's cut
            raise socket.timeout("client timed out")
        return n


class _ClientWriter(io.BufferedIOBase):
    """socketserver's unbuffered writer (one ``send`` per write, as ``sendall`` makes it when
    the socket takes it all), each write bounded by the :class:`ClientClock`: a client that
    reads nothing for client_idle_timeout is let go. A send the socket takes in part (the
    client reads slower than the proxy writes) starts the wait again for the rest: a client
    reading slowly but steadily is not idle (it was cut when one write took that long)."""

    def __init__(self, clock: ClientClock):
        super().__init__()
        self.clock = clock
        self.send = clock.sock.send

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        clock = self.clock
        clock.how = socket.SHUT_RDWR
        clock.due = time.perf_counter() + clock.idle
        try:
            sent = self.send(data)
            if sent < len(data):
                rest = memoryview(data)[sent:]
                while rest:
                    clock.due = time.perf_counter() + clock.idle
                    rest = rest[self.send(rest):]
        finally:
            clock.due = 0.0
        return len(data)


class ProxyHandler(BaseHTTPRequestHandler):
    # Keep-alive with clients; every answer is framed by Content-Length or chunked coding.
    protocol_version = "HTTP/1.1"
    # Nagle's algorithm plus small writes costs ~40 ms per keep-alive response.
    disable_nagle_algorithm = True
    server_version = "proxy_llm"

    # The client socket blocks (no socket timeout): its limits are kept by a ClientClock.
    timeout = None
    # The standard library's parse_request, for a request line this one leaves to it, reads
    # the header block strictly too (headers.StrictMessage).
    MessageClass = StrictMessage

    def setup(self) -> None:
        super().setup()  # self.connection, Nagle's algorithm off
        self.rfile.close()
        self.clock = ClientClock(self.connection, self.server.config.client_idle_timeout)
        # A new connection owes its first request's head within client_header_timeout of the
        # accept, its first byte included: one that sent nothing was kept for client_idle_timeout
        # (4 times as long by default), a thread and a place under max_connections each.
        self.clock.header_deadline = time.perf_counter() + self.server.config.client_header_timeout
        self.rfile = io.BufferedReader(_ClientReader(self.clock), 65536)
        self.wfile = _ClientWriter(self.clock)
        self.server.watch_client(self.clock)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.unwatch_client(self.clock)  # before the server closes the socket

    def handle_one_request(self) -> None:
        # On a kept-alive connection the header deadline starts at the first byte of a request:
        # an idle keep-alive connection only waits under client_idle_timeout. (A new one's
        # first request is timed from the accept: see setup.)
        clock = self.clock
        first = clock.header_deadline is not None
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # idle or header timeout, reset
            self.close_connection = True
            return
        if not first:
            clock.header_deadline = time.perf_counter() + self.server.config.client_header_timeout
        super().handle_one_request()
        clock.header_deadline = None

    def parse_request(self) -> bool:
        """``BaseHTTPRequestHandler.parse_request`` for a plain request line, with the same
        results (command, path, request_version, headers, close_connection, Expect), less
        work; any other line is left to it."""
        self.expect_continue = False
        blanks = 0
        while self.raw_requestline in (b"\r\n", b"\n"):
            # RFC 9112 2.2: empty lines before a request line are ignored (a client's stray
            # CRLFs after a body), not taken for a bad request that silently closes the
            # connection; past EMPTY_LINES_MAX of them, a 400.
            blanks += 1
            if blanks > EMPTY_LINES_MAX:
                self.requestline = self.request_version = self.command = ""
                self.send_error(400, "Bad request line")
                return False
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
                return False
            if not self.raw_requestline:  # (as the standard library leaves a line it refuses)
                self.command, self.request_version, self.requestline = None, self.default_request_version, ""
                self.close_connection = True
                return False
        m = _REQUEST_LINE.fullmatch(self.raw_requestline)
        if m is None:
            if http.client.parse_headers is not headers_mod.parse_headers:
                # (headers.install() not in effect: the standard library would read the block
                # leniently, a request smuggled past a bad line; refused instead.)
                self.requestline = self.raw_requestline.rstrip(b"\r\n").decode("iso-8859-1")
                self.request_version = self.command = ""
                self.send_error(400, "Bad request line")
                return False
            return super().parse_request()
        command, target, minor = m.groups()
        self.command = command.decode("ascii")
        self.requestline = self.raw_requestline.rstrip(b"\r\n").decode("iso-8859-1")
        path = target.decode("ascii")
        if path[:2] == "//":  # as the standard library does (gh-87389): never "//host"
            path = "/" + path.lstrip("/")
        self.path = path
        self.request_version = "HTTP/1.1" if minor == b"1" else "HTTP/1.0"
        self.close_connection = minor == b"0"
        fields = take_fields(self.rfile)
        if fields is None:
            try:
                fields = strict_fields(self.rfile)
            except http.client.LineTooLong as err:
                self.send_error(431, "Line too long", str(err))
                return False
            except http.client.HTTPException as err:
                self.send_error(431, "Too many headers", str(err))
                return False
            if fields is None:  # refused, never guessed at: see headers.strict_fields
                self.send_error(400, "Bad header line (RFC 9112 section 5)")
                return False
        # Kept as pairs: self.headers (an HTTPMessage) is built only if something asks.
        self._message = None
        self._fields = fields
        connection = expect = None
        for name, value in fields:  # the first of each, as HTTPMessage.get()
            lname = name.lower()
            if lname == "connection":
                if connection is None:
                    connection = value.lower()
            elif lname == "expect" and expect is None:
                expect = value.lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if minor == b"1" and expect == "100-continue":
            return self.handle_expect_100()
        return True

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` is answered when the body is about to be read (see
        ``continue_body``), not before the request is checked: a body the proxy refuses (too
        large, an unknown path, a wrong proxy key) is then never sent, and the refusal closes
        the connection."""
        self.expect_continue = True
        return True

    def continue_body(self) -> None:
        if self.expect_continue:
            self.expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # The request's header fields, as parsed: a plain block is kept as (name, value) pairs, and
    # the HTTPMessage of BaseHTTPRequestHandler's API made from them when first asked for.
    _fields: Optional[List[Tuple[str, str]]] = None
    expect_continue = False  # a 100 Continue is owed before the body is read (handle_expect_100)
    empty_query = False  # the target ended with a "?" and no query (proxy)
    interim_passed = False  # an informational head went to the client (pass_interim)
    _message = None

    @property
    def headers(self):
        if self._message is None and self._fields is not None:
            self._message = message(self._fields, self.MessageClass)
        return self._message

    @headers.setter
    def headers(self, value) -> None:
        self._message = value
        self._fields = None

    def header_fields(self) -> List[Tuple[str, str]]:
        """The request's (name, value) fields, in order (= ``headers.items()``)."""
        if self._fields is not None:
            return list(self._fields)
        return list(self._message.raw_items())  # = items(): latin-1 values carry no surrogates

    def headers_done(self) -> None:
        """The request line and headers are in: the body's reads have no header deadline."""
        self.clock.header_deadline = None

    # BaseHTTPRequestHandler dispatches on do_<METHOD>.
    def do_GET(self) -> None:
        self.headers_done()
        if self.path in LOCAL_PATHS or self.path.startswith(LOCAL_QUERIES):
            self.answer_local()
        else:
            self.proxy()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET  # type: ignore

    # -- local endpoints -----------------------------------------------------------------

    def answer_local(self) -> None:
        server = self.server
        te, cl = wire.framing_fields(self.header_fields())
        if te or (cl and [v.strip() for v in cl] != ["0"]):  # (an empty TE too: a front end may read it)
            # Its body is not read: left on the connection, it would be read as the next
            # request (so would one behind a second Content-Length, which a front end may read).
            self.close_connection = True
        if self.path.split("?", 1)[0] == "/health":  # (its query, a probe's cache buster, asks nothing)
            health = server.health()
            body = json.dumps(health).encode("utf-8")
            status = 503 if health["status"] in ("degraded",) and server.config.on_record_error == "fail_closed" else 200
            self.send_simple(status, body, "application/json")
        else:
            self.send_simple(200, server.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    def send_simple(self, status: int, body: bytes, content_type: str, extra: List[Tuple[str, str]] = ()) -> None:
        head = ["HTTP/1.1 %d %s" % (status, self.responses.get(status, ("",))[0]),
                "Content-Type: " + content_type, "Content-Length: %d" % len(body)]
        head.extend("%s: %s" % kv for kv in extra)
        if self.close_connection:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body if self.command != "HEAD" else b""))

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Errors found while parsing the request line or headers: JSON, never HTML."""
        self.close_connection = True
        if code == 431 and explain and explain.startswith("Bad header line"):
            # (headers.BadHeaderLine, raised in the standard library's parse_request, which
            # answers any header error as 431 "Too many headers")
            code, message = 400, explain
        path = getattr(self, "path", "") or ""
        body, ctype = errors.render(errors.family_of(path), code, message or self.responses.get(code, ("error",))[0])
        try:
            self.send_simple(code, body, ctype)
        except OSError:
            pass

    def log_request(self, code="-", size="-") -> None:  # the exchange is logged once, without query
        pass

    def log_message(self, format: str, *args) -> None:
        # BaseHTTPRequestHandler passes the raw request line (with ?key=...) to log_error:
        # it is never logged; only the client address and the message kind are.
        log.debug("client %s: %s", self.client_address[0], format.split("%", 1)[0].strip() or "error")

    # -- the proxy -----------------------------------------------------------------------

    def proxy(self) -> None:
        server = self.server
        target = self.path
        if target[:1] != "/" and (target[:7].lower() == "http://" or target[:8].lower() == "https://"):
            # RFC 9112 3.2.2: a server accepts the absolute form too. Its authority is ignored:
            # only configured upstreams are ever contacted.
            parts = urllib.parse.urlsplit(target)
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        path, query = wire.split_target(target)
        # A "?" with nothing after it is sent on as it came (the query field cannot tell it).
        self.empty_query = not query and target.endswith("?")
        self.upload_passed = False
        if query and server.upload_secret is not None and path.startswith("/upload/"):
            # A chunk of an upload whose URL the proxy handed out (upload_urls): its pass is
            # taken off the query, which goes on and into the record as the upstream gave it.
            query, self.upload_passed = wire.take_upload_pass(server.upload_secret, path, query)
        refused = wire.bad_target(path, query)
        if refused:
            self.close_connection = True  # the request body, if any, was not read
            body, ctype = errors.render(errors.family_of(path, self.header_fields(), query), 400,
                                        "invalid request target: %s" % refused)
            self.send_simple(400, body, ctype)
            return
        if not (path.startswith("/v1/") or errors.forwarded(path)):  # (the hot path: the first test)
            self.close_connection = True  # the request body, if any, was not read
            body, ctype = errors.render(errors.family_of(path, self.header_fields(), query), 404,
                                        "unknown path %s: proxy_llm forwards %s" % (path[:200], _FORWARDED_TEXT))
            self.send_simple(404, body, ctype)
            return
        self.proxy_key_header = None
        self.proxy_key_others = ()  # more headers the client put the proxy key in (rare)
        headers = self.header_fields()
        ex = Exchange(self.command, path, query, headers, *server.capture_limits)
        # The path places the request (a POST to /v1/chat/completions or /v1/messages looks at
        # no header); one every API has (/v1/models) is placed by its headers.
        ex.family = errors.family_of(path, headers, query)
        if not server.track(ex):
            # The drain is over and the recorder closing: a request still coming on a kept-alive
            # connection is not answered (its connection closes, as the process's exit would
            # close it), since its record could not be written.
            self.close_connection = True
            return
        try:
            self.exchange(ex, headers)
        finally:
            ex.duration = ex.elapsed_ms()
            ex.client_sock = None
            ex.upstream_sock = None
            try:
                self.finish_exchange(ex)
            finally:
                server.untrack(ex)  # after the record is queued: wait_idle() covers the queueing

    def exchange(self, ex: Exchange, headers: List[Tuple[str, str]]) -> None:
        server = self.server
        config = server.config
        body = b""
        left = False  # the client left mid-body
        try:
            if server.draining.is_set():  # refused, and recorded as such
                self.close_connection = True  # the request body was not read
                raise errors.Overloaded("proxy_llm is shutting down")
            try:
                self.check_proxy_key(headers)
            except errors.Unauthorized:
                self.close_connection = True  # the request body was not read
                raise
            hosts = sum(1 for name, _ in headers if name.lower() == "host")  # (whichever parser read them)
            if hosts > 1 or (not hosts and self.request_version != "HTTP/1.0"):
                # RFC 9112 3.2: an HTTP/1.1 request without Host, or any with two, is refused.
                # Two may be read as two different origins by a server in front or behind.
                self.close_connection = True  # the request body was not read
                raise errors.BadRequest("a request needs exactly one Host header (RFC 9112 section 3.2)"
                                        if hosts else "an HTTP/1.1 request needs a Host header (RFC 9112 "
                                        "section 3.2)")
            try:
                body = wire.read_body(self.rfile, headers, config.max_request_body, self.continue_body,
                                      self.request_version == "HTTP/1.0")
            except wire.BodyError as exc:  # (a reset or a timeout too: its bytes go into the record)
                self.close_connection = True
                body = exc.partial
                ex.request_cut = True
                left = exc.gone
                if ex.cancelled:  # the shutdown let go of the client (server.cut_waiting_clients)
                    raise errors.Overloaded("proxy_llm is shutting down") from None
                raise {413: errors.BodyTooLarge, 408: errors.RequestTimeout}.get(
                    exc.status, errors.BadRequest)(exc.message) from None
            except OSError:  # the client gone before the 100 Continue
                self.close_connection = True
                raise errors.BadRequest("the connection failed before the request body was read") from None
            self.route(ex, body)
            upgrade = wire.header_value(headers, "upgrade") if self.command == "GET" else None
            if upgrade and "websocket" in upgrade.lower():
                # A WebSocket handshake (always a GET: no scan of the headers for a POST). Upgrade
                # is hop-by-hop: forwarded without it, the handshake reaches the provider as a
                # plain GET, whose error Codex retries for seconds (404) or dies on (400). 426
                # makes it fall back to HTTP at once, and that is recorded.
                self.close_connection = True
                raise errors.UpgradeRefused("proxy_llm relays HTTP only, not WebSocket connections: "
                                            "use the HTTP API")
            if server.recorder is not None and config.on_record_error == "fail_closed" and (
                    server.recorder.degraded or server.recorder.queue_full()):
                notices.refusing(ex.provider, "recording is failing and on_record_error is fail_closed")
                raise errors.Overloaded("recording is failing and on_record_error is fail_closed")
            # Watched from here on: a client that leaves while the upstream is still thinking
            # gets its upstream request cut too (not only once the response is streaming).
            ex.client_sock = self.connection
            resp, conn = self.send_upstream(ex, headers, body)
        except ProxyError as exc:
            ex.capture_request(body)  # when the request never left
            self.answer_error(ex, exc)
            if left:  # answered (a half-closed client may still read it), but it was the client's doing
                ex.ended = "client_aborted"
            return
        except Exception as exc:  # a bug: still an answer in the provider's shape, and a record
            self.close_connection = True  # what is left of the request is not known
            # Where, not what: an exception's message may quote the request.
            log.error("internal error before forwarding (%s), at:\n%s", type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__)).rstrip())
            ex.capture_request(body)
            self.answer_error(ex, ProxyError("proxy_llm failed on this request (%s): a bug, "
                                             "please report it" % type(exc).__name__))
            return
        self.relay(ex, resp, conn)

    def check_proxy_key(self, headers: List[Tuple[str, str]]) -> None:
        """With ``proxy_keys`` set, require one: in X-Proxy-Key, or where the client's SDK puts
        its own key (``Authorization: Bearer``, ``x-api-key``, ``api-key``, ``x-goog-api-key``),
        so that any SDK can take the proxy key as its key. The header that carried it is then
        not forwarded (upstream_headers); the others are, a provider key among them."""
        keys = self.server.config.proxy_keys
        if not keys:
            return
        for i, name in enumerate(PROXY_KEY_HEADERS):
            if _carries_proxy_key(headers, name, keys):
                self.proxy_key_header = name
                # The key in another header too (an SDK's own key set to it, and X-Proxy-Key):
                # none of them goes on (the second one did: an audit's finding).
                self.proxy_key_others = tuple(other for other in PROXY_KEY_HEADERS[i + 1:]
                                              if _carries_proxy_key(headers, other, keys))
                return
        if self.upload_passed:  # (an upload URL the proxy handed out: see wire.UPLOAD_PASS)
            return
        raise errors.Unauthorized("a valid proxy key is required (X-Proxy-Key, Authorization: Bearer, "
                                  "x-api-key, api-key or x-goog-api-key)")

    def route(self, ex: Exchange, body: bytes) -> None:
        """Pick the provider: the first whose ``models`` globs match the request's model, else
        the first of the request's family. Azure OpenAI's paths (``/openai/...``, family
        ``azure``) go to azure providers only, and azure providers serve nothing else: their
        globs are not matched for other paths.

        For Azure, the deployment a path names (``/openai/deployments/<deployment>/...``) is
        the model Azure runs, whatever the body says: the azure providers' globs match it. The
        v1 API's paths (``/openai/v1/...``) name none: the body's model, the deployment there,
        is matched. The record's model is the body's, else the deployment."""
        providers = self.server.config.providers
        if ex.family == "gemini":
            m = _GEMINI_MODEL_RE.search(ex.path)
            if m:
                ex.model = m.group(1)
                ex.stream = m.group(2) == "streamGenerateContent"
        else:
            ex.model, ex.stream = sniff(body)
            if ex.model is None and ex.stream is None and body:  # (compressed, or a form)
                found = joined_headers(ex.req_headers, _BODY_HEADERS)
                ex.model = model_elsewhere(body, found.get("content-type", ""), found.get("content-encoding", ""))
        name = key = ex.model
        azure = ex.family == "azure"
        if azure:
            m = _AZURE_DEPLOYMENT_RE.match(ex.path)
            if m:
                name = m.group(1)
            if ex.model is None:
                ex.model = name
            key = ("azure", name)  # (apart from the other paths' keys, which are models: str or None)
        routes = self.server.model_routes
        hit = routes.get(key)
        if hit is None:
            # Models are few; a client inventing them only resets this (a Memo: bounded in
            # entries and in characters, so a megabyte-long model name is not kept 4,096 times).
            hit = routes.remember(key, first_match(providers, name, azure), len(name) if name else 0)
        if hit is not _NO_MATCH:
            ex.provider, ex.model_label = hit
        else:
            for p in providers:
                if p.type == ex.family:  # (for an azure path, the first azure provider)
                    ex.provider = p
                    break
        if ex.provider is None:
            raise self.no_provider(ex)
        ex.provider_type = ex.provider.type

    def no_provider(self, ex: Exchange) -> errors.NotFound:
        """The 404 of a request no provider serves."""
        # (The path and model as a log line has them: cut short, a key they held would leave
        # its start in the record's answer, where no scrub finds a key cut short.)
        secrets = exchange_secrets(self.server, ex)
        return errors.NotFound("no %sprovider configured for %s%s" % (
            "azure " if ex.family == "azure" else "", wire.log_path(ex.path, secrets)[:200],
            " (model %s)" % wire.log_path(ex.model, secrets)[:100] if ex.model else ""))

    def upstream_headers(self, ex: Exchange, headers: List[Tuple[str, str]], body: bytes) -> List[Tuple[str, str]]:
        provider = ex.provider
        if provider.api_key:
            drop = _DROP_WITH_CREDENTIALS
        else:  # (the header that carried the proxy key, if one of the SDK's, goes too)
            carrier = provider.type, self.proxy_key_header or "x-proxy-key"
            if ex.family != provider.type and foreign_authorization(headers, provider.type):
                drop = _DROP_FOREIGN_AND_AUTHORIZATION[carrier]
            else:
                drop = _DROP_FOREIGN_AND[carrier]
            if self.proxy_key_others:
                drop = drop.union(self.proxy_key_others)
        out = wire.end_to_end(headers, drop)
        pool = self.server.pools[provider.name]
        out.insert(0, ("Host", pool.host_header))
        accept = narrow_accept_encoding(wire.header_value(headers, "accept-encoding"))
        if accept is not None:
            out.append(("Accept-Encoding", accept))
        if body or self.command in ("POST", "PUT", "PATCH") or (
                wire.header_value(headers, "content-length") is not None
                or wire.header_value(headers, "transfer-encoding") is not None):
            # (An empty body the client framed, on a GET or a DELETE, is framed on too.)
            out.append(("Content-Length", str(len(body))))
        if provider.api_key:
            if provider.type == "anthropic":
                out.append(("x-api-key", provider.api_key))
            elif provider.type == "gemini":
                out.append(("x-goog-api-key", provider.api_key))
            elif provider.type == "azure":  # (a client's Entra ID token, Authorization, went with the rest)
                out.append(("api-key", provider.api_key))
            else:
                out.append(("Authorization", "Bearer " + provider.api_key))
        return out

    def send_upstream(self, ex: Exchange, headers, body: bytes):
        config = self.server.config
        pool = self.server.pools[ex.provider.name]
        query = ex.query
        if query and (ex.provider.type != "gemini" or ex.provider.api_key):
            # Gemini's key never goes to another API, nor next to a provider's own key (which
            # replaces the client's credentials, as it does their headers).
            query = wire.without_key_param(query)
        target = pool.target_base + ex.path + ("?" + query if query or self.empty_query else "")
        out_headers = self.upstream_headers(ex, headers, body)
        self.interim_passed = False
        for attempt in (0, 1):
            # The retry is on a new connection: another idle one may be as stale as the first.
            conn, reused = pool.acquire(fresh=attempt == 1)
            sent = False
            try:
                if conn.sock is None:
                    # (Kept before a connect, which no cut reaches: a shutdown that cannot wait
                    # for it records the exchange with its request: record_unfinished.)
                    ex.capture_request(body)
                    connect(conn)  # within connect_timeout; the socket blocks from then on
                    if ex.cancelled:
                        # The shutdown cut or recorded it while it connected: the request does
                        # not go out after the stop (an upstream call nobody answers for).
                        pool.discard(conn)
                        server_metrics_error(self.server, ex, "shutdown")
                        raise errors.Overloaded("proxy_llm is shutting down")
                    if ex.client_gone:
                        # Nor after its client left while it connected (the watchdog saw it):
                        # a call nobody reads, billed all the same. The connection is kept.
                        pool.release(conn)
                        raise errors.ProxyError("the client closed the connection")
                # The socket itself, not the connection: http.client lets go of the socket of a
                # response that ends with a close (the response reads it), and it must be cut too.
                ex.upstream_sock = conn.sock
                # The watchdog cuts the connection if no response head came by then.
                ex.upstream_deadline = time.perf_counter() + config.response_header_timeout
                conn.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
                conn.put_headers(out_headers)
                cut_short = None
                try:
                    conn.send_request_body(body)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    # The upstream may have answered before it read the whole body, and closed:
                    # a 401 or a 413 of a server that does not read what it refuses. Its answer
                    # waits in the socket, as a client reading while it sends would get it.
                    if conn.sock is None:
                        raise
                    cut_short = exc
                sent = cut_short is None
                # The upstream has the request: what is not needed to send it is done while
                # it thinks, not before (cold, each costs the client several microseconds).
                ex.assign_id()
                ex.capture_request(body)
                # 103 Early Hints and the like go to the client as they come (pass_interim).
                conn.on_interim = self.pass_interim if self.request_version != "HTTP/1.0" else None
                try:
                    resp = conn.getresponse()
                except (OSError, http.client.HTTPException):
                    if cut_short is not None:  # no answer: the send's own failure (a stale connection's)
                        raise cut_short from None
                    raise
                finally:
                    conn.on_interim = None  # (a pooled connection holds no finished handler)
                if cut_short is not None:
                    resp.will_close = True  # (the connection is broken: never pooled again)
            except (OSError, http.client.HTTPException) as exc:
                pool.discard(conn)
                # The proxy's own cuts first: what the upstream socket then says (a reset, an
                # end of input) is the cut's doing, not the upstream's failure.
                if ex.client_gone:  # (answer_error sends nothing then)
                    raise errors.ProxyError("the client closed the connection") from None
                if ex.cancelled:
                    server_metrics_error(self.server, ex, "shutdown")
                    raise errors.Overloaded("proxy_llm is shutting down") from None
                if ex.timed_out:
                    server_metrics_error(self.server, ex, "timeout")
                    self.tell(ex, "upstream_timeout", "did not answer within total_timeout (%s s)" %
                              config.total_timeout)
                    raise errors.UpstreamTimeout("upstream %s did not answer within total_timeout" %
                                                 ex.provider.name) from None
                if ex.upstream_late or isinstance(exc, socket.timeout):
                    # Cut by the watchdog (response_header_timeout), or connect_timeout passed.
                    server_metrics_error(self.server, ex, "timeout")
                    if ex.upstream_late:
                        self.tell(ex, "upstream_timeout", "sent no response head within response_header_timeout "
                                  "(%s s)" % config.response_header_timeout)
                    else:
                        self.tell(ex, "upstream_timeout", "not connected within connect_timeout (%s s)" %
                                  config.connect_timeout, exc)
                    raise errors.UpstreamTimeout("upstream %s did not answer in time%s" % (
                        ex.provider.name, pool.via)) from None
                if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
                    if reused and attempt == 0 and not ex.cut and not self.interim_passed and (
                            not sent or replayable(self.command, headers)):
                        # A stale keep-alive connection: retry once on a fresh one. Not a POST
                        # the upstream may have read whole (RFC 9110 9.2.2): it may have run
                        # the call, and the client's own retry policy decides.
                        continue
                    server_metrics_error(self.server, ex, "connection")
                    self.tell(ex, "upstream_unavailable", "closed the connection before answering", exc)
                    raise errors.UpstreamUnavailable("upstream %s closed the connection%s: %s" % (
                        ex.provider.name, pool.via, type(exc).__name__)) from None
                if isinstance(exc, http.client.HTTPException) and sent:
                    # It answered, but not in a head http.client reads (more than 100 header
                    # lines, a line past 64 KiB, a status line that is not HTTP).
                    server_metrics_error(self.server, ex, "protocol")
                    self.tell(ex, "upstream_protocol_error", "sent a response head the proxy cannot read", exc)
                    raise errors.UpstreamProtocolError("upstream %s sent a response head the proxy cannot read%s (%s)" % (
                        ex.provider.name, pool.via, type(exc).__name__)) from None
                server_metrics_error(self.server, ex, "connection")
                self.tell(ex, "upstream_unavailable", "unreachable", exc)
                # (An EgressProxyError names the proxy itself: the tunnel it refused, its 407.)
                raise errors.UpstreamUnavailable("upstream %s unreachable%s: %s" % (
                    ex.provider.name, "" if isinstance(exc, EgressProxyError) else pool.via,
                    exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__)) from None
            # The head is in. From here on the relay sets a limit around each read of the body
            # (stream_idle_timeout), and none while it writes to the client.
            ex.upstream_deadline = 0.0
            if resp.status == 101 or resp.codings:
                self.check_head(ex, resp, conn)
            return resp, conn
        raise AssertionError("unreachable")

    def pass_interim(self, status: int, phrase: str, fields: List[Tuple[str, str]]) -> None:
        """An informational head (103 Early Hints, 102 Processing) goes to the client as soon as
        it is read, with its end-to-end fields (RFC 9110 15.2): its point is to come before the
        final response (Early Hints, to start the preloads while the server thinks). Until
        2026-12-07 it waited for the final head and went with it. Not to HTTP/1.0 clients,
        which have no informational responses. A client gone is found by the final head's write."""
        self.interim_passed = True
        head = "HTTP/1.1 %d %s\r\n%s\r\n" % (status, phrase, "".join(
            ["%s: %s\r\n" % field for field in wire.end_to_end(fields)]))
        try:
            self.wfile.write(head.encode("latin-1"))
        except OSError:
            pass

    def check_head(self, ex: Exchange, resp: Response, conn: http.client.HTTPConnection) -> None:
        """Refuse, as an upstream protocol error (a 502), a head the proxy cannot relay: a 101
        (RFC 9110 15.2.2: a server must not switch to a protocol the client did not ask for, and
        the proxy forwards no Upgrade, so it never asked), or a body in a transfer coding it
        cannot take off (``upstream.TRANSFER_CODINGS``)."""
        if resp.status == 101:
            problem = "switched protocols (101) without being asked to: proxy_llm relays HTTP only"
        else:
            unknown = [c for c in resp.codings if c not in TRANSFER_CODINGS]
            if not unknown:
                return
            problem = "sent a body in a transfer coding proxy_llm cannot decode (%s)" % ", ".join(unknown)[:100]
        self.let_go(ex)
        self.server.pools[ex.provider.name].discard(conn)
        server_metrics_error(self.server, ex, "protocol")
        self.tell(ex, "upstream_protocol_error", problem)
        raise errors.UpstreamProtocolError("upstream %s %s" % (ex.provider.name, problem))

    def relay(self, ex: Exchange, resp: Response, conn: http.client.HTTPConnection) -> None:
        """Send the upstream response to the client as it arrives; capture it on the way."""
        pool = self.server.pools[ex.provider.name]
        ex.status = resp.status
        ex.resp_headers = list(resp.msg.raw_items())
        fields = ex.resp_headers
        if ex.family == "gemini" and ex.path.startswith("/upload/"):
            fields = self.upload_urls(ex, pool, fields)  # (the record keeps the upstream's)
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        known_length = resp.length is not None and not resp.chunked
        http10 = self.request_version == "HTTP/1.0"
        frame = not no_body and not known_length and not http10
        drop = DROP_RESPONSE if not known_length else ()
        head = ["HTTP/1.1 %d %s" % (resp.status, resp.phrase)]
        for name, value in wire.end_to_end(fields, drop):
            head.append("%s: %s" % (name, value))
        if frame:
            head.append("Transfer-Encoding: chunked")
        elif not no_body and not known_length:
            self.close_connection = True  # HTTP/1.0 client: the end of the body is the close
        if self.close_connection:
            head.append("Connection: close")
        head.append("X-Proxy-Record-Id: " + ex.id)
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        write = self.wfile.write
        capture = ex.response.add
        t0 = ex.t0
        perf_counter = time.perf_counter
        idle = self.server.config.stream_idle_timeout
        complete = False
        try:
            if no_body or (known_length and resp.length <= SMALL_BODY and not is_event_stream(resp.content_type)):
                # One write for headers and a small body (not events, even of a known length:
                # each goes on as it comes).
                ex.upstream_deadline = perf_counter() + idle
                cut = False
                try:
                    data = resp.read() if not no_body else b""
                except (OSError, http.client.HTTPException) as exc:
                    cut = True
                    if ex.upstream_late:
                        self.upstream_failed(ex, "timeout", "upstream stalled while sending the body")
                    else:
                        self.upstream_failed(ex, "upstream_error", "upstream failed while sending the body: %s" % type(exc).__name__, exc)
                    # The client gets what it would have got directly: the head and the bytes
                    # that came, then the close (upstream_failed set it) short of the length.
                    data = exc.partial if isinstance(exc, http.client.IncompleteRead) else b""
                ex.upstream_deadline = 0.0
                now = (perf_counter() - t0) * 1000.0
                if data:
                    ex.ttft = now
                    capture(now, data)
                if cut and ex.client_gone:
                    return
                try:
                    write(head_bytes + data)
                except OSError:
                    ex.ended = "client_aborted"
                    return
                complete = not cut
                return
            try:
                write(head_bytes)
            except OSError:
                ex.ended = "client_aborted"
                return
            ex.client_sock = self.connection
            # A body in gzip or deflate transfer coding (hop-by-hop, as chunked is) goes on decoded.
            read1 = resp.read1 if not resp.codings else decoded(resp.read1, resp.codings)
            while True:
                # The upstream's silence counts while the relay waits for it, not while a slow
                # client holds up the write below.
                ex.upstream_deadline = perf_counter() + idle
                try:
                    data = read1(65536)
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    if ex.upstream_late:
                        self.upstream_failed(ex, "timeout", "upstream stream idle for more than %s s" % idle)
                    else:
                        self.upstream_failed(ex, "upstream_error", "upstream stream broke: %s" % (
                            exc if isinstance(exc, TransferCodingError) else type(exc).__name__), exc)
                    return
                if not data:
                    break
                ex.upstream_deadline = 0.0
                now = (perf_counter() - t0) * 1000.0
                if ex.ttft is None:
                    ex.ttft = now
                capture(now, data)
                try:
                    write(wire.chunk(data) if frame else data)
                except OSError:
                    ex.ended = "client_aborted"
                    return
            if ex.cut:
                # Cut by the watchdog or a shutdown: the end of the body was not the upstream's.
                self.upstream_failed(ex, "timeout", "upstream stream idle for more than %s s" % idle)
                return
            if known_length:
                if resp.length:
                    self.upstream_failed(ex, "upstream_error", "upstream closed the body early")
                    return
                resp.close()  # read to its length: read1 leaves it open, and only closed ones are pooled
            if frame:
                try:
                    write(wire.LAST_CHUNK)
                except OSError:
                    ex.ended = "client_aborted"
                    return
            complete = True
        finally:
            self.let_go(ex)
            # After let_go nothing cuts the socket any more; a cut before it (the flags are set
            # first) may have come after the last read, so such a connection is never pooled.
            if complete and not resp.will_close and resp.isclosed() and not ex.cut:
                pool.release(conn)
            else:
                pool.discard(conn)
                if not complete:
                    self.close_connection = True

    def upload_urls(self, ex: Exchange, pool: UpstreamPool, fields: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        """``fields``, the upstream's answer to a Gemini upload request, with the upload URL it
        names made the proxy's: the one header the proxy changes.

        A resumable upload's start answers with the URL each chunk of the file goes to:
        ``X-Goog-Upload-URL`` (Google's upload protocol: the Gen AI SDKs, Google's curl example),
        or ``Location`` on a 2xx (``uploadType=resumable``, the protocol of Google's API client
        libraries). That URL is on the provider's origin, and a client sends the file there,
        past the proxy (the Google Gen AI SDK does, with the client's base_url alone): its bytes
        were not recorded, and where only the proxy may reach the provider the upload failed.
        So a URL under the provider's base_url (scheme, host, port, base path) that the proxy
        forwards is given the proxy's origin as the client addressed it (:meth:`client_origin`),
        the path under the base and the query kept; for a provider with an api_key, without a
        ``key=``, which can then only be that key's echo. Any other URL goes on as it came.
        The start's session headers are kept for the records of the upload's chunks, which
        carry none (record.UploadSessions). Returns ``fields`` itself when nothing changes."""
        out = None
        origin = None
        for i, (name, value) in enumerate(fields):
            lname = name.lower()
            if lname != "x-goog-upload-url" and (lname != "location" or not 200 <= ex.status < 300):
                continue  # (a redirect's Location is passed on as any redirect is)
            where = wire.under_base(value, pool.scheme, pool.host, pool.port, pool.base_path)
            if where is None:
                continue
            path, query, fragment = where
            if not errors.forwarded(path) or wire.bad_target(path, query):
                continue  # the proxy would not forward it: the client had better go there
            if query and ex.provider.api_key:
                query = wire.without_key_param(query)
            if origin is None:
                origin = self.client_origin(ex)
                if origin is None:
                    return fields
            if self.server.uploads is not None:  # (the chunks' records join the start's session)
                self.server.uploads.started(path, query, ex.req_headers, ex.query)
            if self.server.upload_secret is not None:  # (the chunks carry no proxy key)
                query = wire.with_upload_pass(self.server.upload_secret, path, query)
            url = "%s%s%s%s" % (origin, path, "?" + query if query else "", "#" + fragment if fragment else "")
            if out is None:
                out = list(fields)
            out[i] = (name, url)
        return fields if out is None else out

    def client_origin(self, ex: Exchange) -> Optional[str]:
        """The proxy's origin as the client addressed it, ``scheme://host[:port]`` (None if the
        connection is gone). The scheme and the host a reverse proxy in front received, each as
        the request's forwarding fields give it (:func:`forwarded_origin`); else ``http``, and
        the request's ``Host`` when it is a plain ``host[:port]``, else the address the client's
        connection reached."""
        scheme, host = forwarded_origin(ex.req_headers)
        if host is None:
            host = wire.header_value(ex.req_headers, "host")
            if host is not None:
                host = host.strip()
                if not _AUTHORITY_RE.match(host):
                    host = None
        if host is None:
            try:
                address = self.connection.getsockname()
            except OSError:  # (the connection is gone: there is nobody to answer)
                return None
            host = authority(address[0], address[1])
        return "%s://%s" % (scheme or "http", host)

    def let_go(self, ex: Exchange) -> None:
        """The relay is done with the upstream connection: from now on nothing cuts it for
        this exchange (it may go back to the pool and serve another)."""
        ex.upstream_deadline = 0.0
        with self.server.conn_lock:
            ex.upstream_sock = None

    def upstream_failed(self, ex: Exchange, ended: str, message: str, exc: Optional[BaseException] = None) -> None:
        """The relay stopped early: name the ending (the client's abort or shutdown win).
        ``message`` is the record's ("upstream <what>[: <exception class>]"), ``exc`` what
        the read raised, for the operator's line (tell)."""
        self.close_connection = True
        if ex.cancelled:
            ended, message = "shutdown", "the proxy shut down before the exchange ended"
        elif ex.client_gone:
            ended, message = "client_aborted", "the client closed the connection"
        elif ex.timed_out:
            ended, message, exc = "timeout", "total_timeout passed", None
        ex.ended = ended
        if ended != "client_aborted":
            ex.error = {"type": ended, "message": message}
            server_metrics_error(self.server, ex, ended)
            if ended != "shutdown":
                # The line's phrase is the record's, without "upstream " and the class (the
                # line gives the exception whole).
                what = message[9:] if message.startswith("upstream ") else message
                if exc is not None:
                    what = what.partition(": ")[0]
                self.tell(ex, ended, what, exc)

    def tell(self, ex: Exchange, kind: str, what: str, exc: Optional[BaseException] = None) -> None:
        """The operator's WARNING line of an exchange that failed on the upstream's side
        (notices.upstream_failed: rate-limited per provider and ``kind``, the record's error
        type), with the exchange's secrets and the proxy's kept out of the exception's text.
        Only ever called on a failure branch."""
        secrets = exchange_secrets(self.server, ex) if exc is not None else ()
        notices.upstream_failed(ex.provider, kind, what, exc, secrets)

    def answer_error(self, ex: Exchange, exc: ProxyError) -> None:
        if ex.claimed:
            # The shutdown recorded it as it stood, unanswered (record_unfinished), and its
            # record may be in the writer's hands: the client gets what the record says, nothing.
            self.close_connection = True
            return
        if ex.client_gone:  # the watchdog cut the upstream because the client left: nobody to answer
            self.close_connection = True
            ex.ended = "client_aborted"
            return
        body, ctype = errors.render(ex.family, exc.status, exc.message, exc.kind)
        ex.status = exc.status
        ex.error = {"type": exc.kind, "message": exc.message}
        if ex.cancelled:
            ex.ended = "shutdown"
        elif exc.status == 504:
            ex.ended = "timeout"
        elif isinstance(exc, errors.UpstreamUnavailable):
            ex.ended = "upstream_error"
        else:  # the proxy's own answer (400, 401, 404, 413, 426, 503, a bug's 500): no upstream in it
            ex.ended = "refused"
        ex.resp_headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        ex.response.add(ex.elapsed_ms(), body)
        extra = [("X-Proxy-Record-Id", ex.assign_id())]
        if exc.status == 503:
            extra.append(("Retry-After", "1"))
        try:
            self.send_simple(exc.status, body, ctype, extra)
        except OSError:
            ex.ended = "client_aborted"

    def finish_exchange(self, ex: Exchange) -> None:
        if not ex.claim():
            return  # the shutdown recorded it (record_unfinished): this handler ended too late
        if ex.ended == "client_aborted" and (ex.cancelled or self.clock.stopped):
            # A read or write that failed because the shutdown let go of the client: also that
            # of an exchange begun after the shutdown cut those in flight (a 503 refusal), which
            # is not ``cancelled``.
            ex.ended = "shutdown"
        record_exchange(self.server, ex)


def record_unfinished(server) -> int:
    """At shutdown, once the wait for the exchanges cut has run out: record, as ``shutdown``,
    each exchange still in flight, as it stands, and return how many. A handler may not end in
    time: one still connecting to its upstream (a connect or a DNS lookup, which no cut
    reaches, up to ``connect_timeout``) got no record when the process exited, and nothing
    counted it. Its handler, if it ends before the exit, records nothing (Exchange.claim)."""
    n = 0
    for ex in server.in_flight():
        if not ex.claim():
            continue  # its handler is recording it
        ex.duration = ex.elapsed_ms()
        ex.cancelled = True
        if ex.error is None:
            ex.ended = "shutdown"
        record_exchange(server, ex)
        n += 1
    return n


def exchange_secrets(server, ex: Exchange) -> List[str]:
    """What a message or a log line about ``ex`` must not hold: every credential the request
    carried (headers, query) and every key the proxy holds (provider keys, egress passwords)."""
    return wire.request_secrets(ex.req_headers, ex.query) + server.provider_keys


_CONTENT_TYPE = ("content-type",)
_BODY_HEADERS = ("content-type", "content-encoding")


def record_exchange(server, ex: Exchange) -> None:
    """Count an exchange that ended in the metrics and queue its record."""
    ex.assign_id()
    ex.endpoint_label = endpoint_label(ex.path)
    m = server.metrics
    provider = ex.provider.name if ex.provider is not None else "none"
    sse = ex.status is not None and is_event_stream(
        joined_headers(ex.resp_headers, _CONTENT_TYPE).get("content-type", ""))
    ttft = ex.ttft / 1000.0 if (ex.stream or sse) and ex.ttft is not None else None
    m.exchange(provider, ex.endpoint_label, status_class(ex.status), ex.model_label, ex.duration / 1000.0, ttft)
    server.counts.submit(ex)  # (its ending and tokens are counted there, once read)
    if log.isEnabledFor(logging.DEBUG):
        # The path without the exchange's secrets (a key may be a segment of it): the query,
        # which may hold ?key=, is not logged at all.
        secrets = exchange_secrets(server, ex)
        log.debug("%s %s -> %s %s %.1f ms %s", ex.method, wire.log_path(ex.path, secrets), provider, ex.status,
                  ex.duration, ex.ended)


_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))


class ReserveHandler(ProxyHandler):
    """A connection past ``max_connections``, on the server's reserve (``health_reserve``):
    its one request is answered if it is for ``/health`` or ``/metrics`` (a load balancer's or
    an orchestrator's probe of a busy proxy), with the connection limit's 503 otherwise, as a
    connection past the cap gets; then the connection is closed. Nothing is forwarded or
    recorded."""

    def do_GET(self) -> None:
        self.headers_done()
        self.close_connection = True
        if self.path in LOCAL_PATHS or self.path.startswith(LOCAL_QUERIES):
            self.answer_local()
        else:
            self.server.metrics.refused.inc()
            self.wfile.write(errors.CONNECTION_LIMIT_ANSWER)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET  # type: ignore


def replayable(method: str, headers: List[Tuple[str, str]]) -> bool:
    """Whether a request may be sent again after its connection failed once it was sent: an
    idempotent method (RFC 9110 9.2.2), or a request with an ``Idempotency-Key``."""
    if method in _IDEMPOTENT:
        return True
    for name, _ in headers:
        if name.lower() in ("idempotency-key", "x-idempotency-key"):
            return True
    return False


def _carries_proxy_key(headers: List[Tuple[str, str]], name: str, keys: List[str]) -> bool:
    """Whether the header ``name`` (one of PROXY_KEY_HEADERS) holds one of the proxy ``keys``
    (``Authorization`` as a Bearer token), compared in constant time."""
    candidate = wire.header_value(headers, name)
    if not candidate:
        return False
    candidate = candidate.strip()
    if name == "authorization":
        if candidate[:7].lower() != "bearer ":
            return False
        candidate = candidate[7:].strip()
    value = candidate.encode("utf-8", "surrogatepass")
    return any(hmac.compare_digest(value, key.encode("utf-8")) for key in keys)


def first_match(providers, model: Optional[str], azure: bool):
    """``(provider, glob)`` of the first provider whose ``models`` globs match ``model``, among
    the azure providers (``azure``) or the others; ``_NO_MATCH`` when none does."""
    for p in providers:
        if (p.type == "azure") is azure:
            glob = p.matches(model)
            if glob is not None:
                return p, glob
    return _NO_MATCH


def foreign_authorization(headers: List[Tuple[str, str]], provider_type: str) -> bool:
    """Whether an ``Authorization`` header carries, as a Bearer token, a key shaped like the key
    of an API other than ``provider_type``'s. Asked only of a request routed (by its model) to a
    provider of another type than its own API: an OpenAI-type provider may be Anthropic's or
    Google's OpenAI-compatible endpoint, and take their keys from OpenAI clients."""
    for name, value in headers:
        if name.lower() == "authorization":
            token = value.strip()
            if token[:7].lower() == "bearer ":
                token = token[7:].lstrip()
            for prefix, owner in _KEY_OWNERS:
                if token.startswith(prefix) and owner != provider_type:
                    return True
    return False


def server_metrics_error(server, ex: Exchange, kind: str) -> None:
    server.metrics.upstream_errors.inc(ex.provider.name if ex.provider is not None else "none", kind)
