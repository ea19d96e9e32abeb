"""Per-provider pools of ``http.client`` connections.

A connection goes back to the pool only after its response was read to the end and the server
did not ask to close it; any error discards it. Before reuse, an idle connection is checked for
readability: an idle HTTP/1.1 connection has nothing to say, so a readable socket means the
server closed it (EOF) or sent more than its response (bytes that would otherwise be read as
the next client's response), and it is discarded instead. Every time: a check skipped for a
connection idle a moment (as until 2026-12-06) let such bytes reach another client.
A request that still fails on a reused connection before any response byte arrived is retried
once on a fresh one (the server closed it in the race between our check and our send) when it
failed while being sent, or when sending it twice is harmless (``handler.replayable``): a POST
the server may have read whole is not, since it may have run the call. Nothing is retried
after a response started.

One ``ssl.SSLContext`` is built per provider at start (building one costs ~16 ms) and shared by
its connections. The pool never follows redirects and only ever connects to the configured
``base_url``: no part of the client's request chooses the host.

A provider may be reached through an HTTP egress proxy (:class:`EgressProxy`): an https one
through a CONNECT tunnel per connection (:class:`TunnelConnection`; TLS runs end to end inside
it, and the tunnel is pooled and reused like any connection), an http one with each request in
absolute form (:class:`ForwardConnection`). A direct connection is the same object as without
a proxy: the proxy's work is done by other classes, on connections that have one.
"""

from __future__ import annotations

import base64
import http.client
import io
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections import deque
from typing import Deque, Iterable, List, Optional, Tuple

from .headers import message, response_headers, take_fields


# Request bodies up to this size go out in the same send as the request head (one copy, one
# system call, and one wake-up of the upstream instead of two); larger ones are sent after it.
COALESCE_MAX = 256 * 1024


# What putheader() accepts, checked for all headers at once (a subset: anything else goes
# through putheader itself, and its errors): ASCII names that start with neither a colon nor
# white space and hold no colon, CR or LF (joined by colons: as many as the joins); values with CR
# or LF only as obsolete line folding (joined by CRLF SP, which cannot turn an illegal end of
# one value into a legal one).
_NAMES = re.compile(r"[^: \t\n\r\x0b\x0c\x80-\U0010ffff][^:\r\n\x80-\U0010ffff]*"
                    r"(?::[^: \t\n\r\x0b\x0c\x80-\U0010ffff][^:\r\n\x80-\U0010ffff]*)*")
_ILLEGAL_VALUE = re.compile(r"\n(?![ \t])|\r(?![ \t\n])")


class _OneSend:
    """Fewer calls and system calls per request, the same bytes on the wire.

    ``http.client`` checks and encodes each header in its own ``putheader`` call, and sends the
    request head and the body in two ``send`` calls (two TCP segments, two wake-ups of the
    upstream). :meth:`put_headers` checks the whole block with one regular expression
    (falling back to ``putheader``, and its errors, for anything unusual); :meth:`send` holds
    the head back so that :meth:`send_request_body` sends it with the body.
    tests/test_upstream.py compares the bytes with ``http.client``'s own calls.
    """

    _hold = False
    _held = None
    # The next response's ``on_interim`` (None: its informational heads are only kept).
    on_interim = None

    def response_class(self, sock, *args, **kwargs) -> "Response":
        """A :class:`Response` (what ``getresponse`` makes), given this ``on_interim``."""
        resp = Response(sock, *args, **kwargs)
        resp.on_interim = self.on_interim
        return resp

    def put_headers(self, headers) -> None:
        """``putheader`` for every (name, value), checked and encoded as one block."""
        names = ":".join([name for name, _ in headers])
        if (_NAMES.fullmatch(names) is not None and names.count(":") == len(headers) - 1
                and _ILLEGAL_VALUE.search("\r\n ".join([value for _, value in headers])) is None):
            try:
                self._output("\r\n".join([name + ": " + value for name, value in headers]).encode("latin-1"))
                return
            except UnicodeEncodeError:
                pass
        for name, value in headers:  # raises putheader's own error for the bad one
            self.putheader(name, value)

    def send_request_body(self, body: bytes) -> None:
        """``endheaders(body)``, with the head and ``body`` in one write when small."""
        self._hold = bool(body) and len(body) <= COALESCE_MAX
        try:
            self.endheaders(body or None)
        finally:
            held, self._held, self._hold = self._held, None, False
        if held is not None:  # endheaders sent no body after the head: send the head alone
            super().send(held)

    def send(self, data) -> None:
        if self._hold:
            self._hold = False
            self._held = data
            return
        held = self._held
        if held is not None:
            self._held = None
            data = held + data
        super().send(data)


# A status line as providers send it: HTTP/1.0 or 1.1, a three-digit status, an optional reason
# phrase of the characters RFC 9112 4 allows in one (HTAB, SP, VCHAR, obs-text).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n")
# Any other status line the standard library reads: the phrase is what follows the status code
# and one blank, its line end aside; a character a phrase may not hold puts the standard one in
# its place (a status line must stay one line).
_LOOSE_STATUS = re.compile(r"\s*\S+\s+\S+(?:[ \t](.*?))?(?:\r?\n)?\Z", re.S)
_NOT_IN_PHRASE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")
# The status lines of those the proxy relays: RFC 9112 4 with the leniency it allows a recipient
# (words apart by any of SP, HTAB, VT, FF and bare CR, blanks before the line), a status of
# three digits. The standard parser splits on whatever str.split() takes for white space (\x1c
# to \x1f, \x85, \xa0 too) and reads the status with int() ("+200", "2_00" and "0200" are 200):
# a line no HTTP client would read as that status would reach the client as a plain one.
_LENIENT_STATUS = re.compile(rb"[ \t\x0b\x0c\r]*HTTP/[\x21-\x7e]*[ \t\x0b\x0c\r]+[0-9]{3}"
                             rb"(?:[ \t\x0b\x0c\r][^\n]*)?\n?\Z")
_BEGIN_HEADERS = frozenset(("transfer-encoding", "content-length", "connection", "keep-alive", "proxy-connection",
                            "content-type"))


class Response(http.client.HTTPResponse):
    """``http.client.HTTPResponse`` with a shorter :meth:`begin` for a plain response head.

    The standard ``begin`` reads the status line, then the header block, then asks the parsed
    message for each header it needs (each ask a scan of every header). When the status line is
    plain, and the header block plain and in the buffer (see ``headers.take_fields``), this one
    takes both from the buffer and derives the same attributes (status, reason, version,
    headers, chunked, length, will_close) in one pass; any other status line is read by the
    standard ``_read_status``, any other block by ``headers.response_headers``.
    tests/test_upstream.py compares the two. Where the standard ``begin`` misreads the
    framing, this one does not, on purpose (each case tested): a header block with a line it
    cannot read (it took every field after it for the body), ``Transfer-Encoding`` with blanks
    or codings before ``chunked`` (it read those to the close), codings without ``chunked``
    last (it read the body by its ``Content-Length``: it ends at the close), and a
    ``Content-Length`` that is a list of one value or not a number (it read to the close; now
    that value, or an error: a 502). It also keeps the reason phrase as sent (``phrase``), which
    the standard one strips, and names the transfer codings besides chunked (``codings``), for
    :func:`decoded` to take off.
    """

    interim: List[Tuple[int, str, List[Tuple[str, str]]]] = []
    # The first Content-Type's value ("" for none), read with the framing's fields: the relay
    # goes on with an event stream as it comes, whatever its length.
    content_type = ""
    # Called with each informational head (status, phrase, fields) as it is read, so that it
    # reaches the client then, not with the final head (set by ``_OneSend.response_class``).
    on_interim = None
    # The reason phrase as the upstream sent it, for the status line the proxy writes (``reason``
    # is stripped, as http.client has it), or the standard phrase in place of one that holds a
    # character no phrase may (RFC 9112 4: CR, LF, NUL, another control).
    phrase = ""
    # The transfer codings the body is in, besides chunked, in the order applied (RFC 9112 7):
    # ``decoded`` takes them off. Empty for the usual body, and for any without a body.
    codings: Tuple[str, ...] = ()

    def begin(self) -> None:
        """Read the response head; informational (1xx) heads before it are kept in ``interim``
        as (status, phrase, fields), to be passed on (RFC 9110 15.2). The standard ``begin``
        skips 100 Continue only: any other, 103 Early Hints say, became the response, and the
        final one was never read. 100 itself is not kept (the proxy answered its client's
        ``Expect`` on its own), nor is 101 skipped: the proxy forwards no ``Upgrade``, so a 101
        is one it did not ask for, and the handler refuses it."""
        self.interim = []
        while True:
            self._begin()
            status = self.status
            if not 100 <= status < 200 or status == 101:
                return
            if status != 100:
                head = (status, self.phrase, list(self.msg.raw_items()))
                self.interim.append(head)
                if self.on_interim is not None:
                    self.on_interim(*head)
            self.headers = self.msg = None  # (begin reads a head only while there is none)

    def _read_status(self):
        """The standard ``_read_status`` (same results, same errors), which also sets ``phrase``
        from the line as it came: the reason it returns has lost the blanks before it. A line
        it takes that is not a status line to RFC 9112 4, leniency included, is refused too
        (``BadStatusLine``: the client gets a 502), rather than passed on as another status."""
        fp = self.fp
        self.fp = line = _KeptLine(fp)
        try:
            version, status, reason = super()._read_status()
        finally:
            if self.fp is line:  # (a line it refuses closes the connection: self.fp is None then)
                self.fp = fp
        if _LENIENT_STATUS.match(line.line) is None:
            raise http.client.BadStatusLine(line.line.decode("iso-8859-1"))
        m = _LOOSE_STATUS.match(line.line.decode("iso-8859-1"))
        self.phrase = _phrase(status, (m.group(1) or "") if m is not None else None)
        return version, status, reason

    def _begin(self) -> None:
        if self.headers is not None or self.debuglevel > 0:
            return super().begin()
        fp = self.fp
        m = _STATUS_LINE.match(fp.peek(1))
        if m is not None:  # a plain status line, whole in the buffer
            fp.read(m.end())
            status = int(m.group(2))
            if m.group(3):
                self.phrase = m.group(3).decode("iso-8859-1")
                reason = self.phrase.strip()
            else:
                self.phrase = reason = ""
            version = 11 if m.group(1) == b"1" else 10
        else:  # any other, read as the standard begin reads it (and refused as it refuses)
            text, status, reason = self._read_status()
            if text in ("HTTP/1.0", "HTTP/0.9"):
                version = 10
            elif text.startswith("HTTP/1."):
                version = 11
            else:
                raise http.client.UnknownProtocol(text)
            reason = reason.strip()
        fields = take_fields(fp)  # None, with nothing read, unless plain and in the buffer
        if fields is None:  # not plain (or no fields at all): the standard begin's parse
            msg = response_headers(fp)
            fields = list(msg.raw_items())
        else:
            msg = message(fields)
        self.code = self.status = status
        self.reason = reason
        self.version = version
        self.headers = self.msg = msg
        first = {}  # the first value of each header begin() needs, as HTTPMessage.get() gives it
        for name, value in fields:
            lname = name.lower()
            if lname in _BEGIN_HEADERS:
                if lname not in first:
                    first[lname] = value
                elif lname == "transfer-encoding" or lname == "content-length":
                    # (Its lines are one list, RFC 9110 5.3: Content-Length's then has to be
                    # one value given again, below, as on one line.)
                    first[lname] += ", " + value
        te = first.get("transfer-encoding")
        length = first.get("content-length")
        self.content_type = first.get("content-type", "")
        connection = first.get("connection")
        keep_alive = first.get("keep-alive")
        proxy_connection = first.get("proxy-connection")
        # Chunked when chunked is the last coding (RFC 9112 6.3), blanks around it aside: the
        # standard begin wants the value "chunked" and nothing else, and read "chunked " or
        # "gzip, chunked" to the close, chunk sizes and all, handed on as the body.
        no_body = status == 204 or status == 304 or 100 <= status < 200 or self._method == "HEAD"
        if te and te.lower() == "chunked":
            self.chunked = True
            self.chunk_left = None
        else:
            self.chunked = False
            if te:
                self._transfer_codings(te, no_body)
        # HTTPResponse._check_close
        if self.version == 11:
            self.will_close = bool(connection and "close" in connection.lower())
        else:
            self.will_close = not (keep_alive or (connection and "keep-alive" in connection.lower())
                                   or (proxy_connection and "keep-alive" in proxy_connection.lower()))
        self.length = None
        if length and not self.chunked and not self.codings:
            if length.isdigit() and length.isascii():  # (int() takes "+2", " 2" and "0_2" too)
                self.length = int(length)
            elif not no_body:
                # RFC 9112 6.3: a list of one value given again ("7, 7") is that value; any
                # other is an error, not a body to read to the close (the standard begin's
                # reading, which a keep-alive upstream answers with silence).
                values = {v.strip(" \t") for v in length.split(",")}
                value = values.pop() if len(values) == 1 else ""
                if not (value.isdigit() and value.isascii()):
                    raise http.client.HTTPException("invalid Content-Length")
                self.length = int(value)
        if no_body:
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def _transfer_codings(self, te: str, no_body: bool) -> None:
        """``chunked`` and ``codings`` from a Transfer-Encoding other than "chunked" alone.

        Codings other than chunked (gzip, ...) are the proxy's to take off: they are hop-by-hop
        as chunked is. Without chunked last, the body ends at the close (RFC 9112 6.3), whatever
        Content-Length says; identity (a coding no longer registered) is no coding at all."""
        codings = [c.strip(" \t").lower() for c in te.split(",")]
        if codings[-1] == "chunked":
            self.chunked = True
            self.chunk_left = None
            codings.pop()
        if not no_body:
            self.codings = tuple([c for c in codings if c and c != "identity"])


class _KeptLine:
    """A response's reader that keeps the line read from it (``Response._read_status``)."""

    __slots__ = ("fp", "line")

    def __init__(self, fp):
        self.fp = fp
        self.line = b""

    def readline(self, limit: int = -1) -> bytes:
        self.line = self.fp.readline(limit)
        return self.line

    def close(self) -> None:
        self.fp.close()


def _phrase(status: int, phrase: Optional[str]) -> str:
    """``phrase`` if a status line may hold it, else the standard phrase of ``status`` ("" for a
    status without one)."""
    if phrase is None or _NOT_IN_PHRASE.search(phrase) is not None:
        return http.client.responses.get(status, "")
    return phrase


# The transfer codings the proxy takes off a body, besides chunked (RFC 9112 7).
TRANSFER_CODINGS = frozenset(("gzip", "x-gzip", "deflate"))


class TransferCodingError(http.client.HTTPException):
    """A body its transfer coding does not decode: corrupt, or cut short."""


def decoded(read1, codings: Tuple[str, ...]):
    """``read1`` of a body in ``codings`` (each in ``TRANSFER_CODINGS``, in the order applied),
    with them taken off, the last applied first: each call gives at most ``n`` decoded bytes,
    as they come (no more than one read of the body at a time), and b"" at the end."""
    for coding in reversed(codings):
        read1 = _Inflate(read1, coding).read1
    return read1


class _Inflate:
    """One transfer coding taken off a body as it arrives (``zlib.decompressobj``).

    gzip may come as several members one after the other (each decoded in turn); deflate is the
    zlib format (RFC 9110 8.4.1.2), or raw deflate as some servers send it, told apart by the
    first two bytes. A read that decodes to nothing yet (a gzip header) reads on: b"" is the end.
    An end before the coding's own (a body cut short) or bytes it cannot decode raise
    :class:`TransferCodingError`.
    """

    __slots__ = ("read_raw", "coding", "z", "pending", "done")

    def __init__(self, read1, coding: str):
        self.read_raw = read1
        self.coding = coding
        self.z = None  # made when the first bytes come
        self.pending = b""  # input not decoded yet (past the output limit, or after a gzip member)
        self.done = False

    def read1(self, n: int = 65536) -> bytes:
        if n <= 0:
            n = 65536
        while not self.done:
            data = self.pending
            if data:
                self.pending = b""
            else:
                data = self.read_raw(65536)
                if not data:
                    return self._end()
            z = self.z
            if z is None:
                if self.coding != "deflate":
                    z = self.z = zlib.decompressobj(47)  # (47: a zlib header is taken too, as record does)
                elif len(data) < 2:  # deflate: its first two bytes tell whether it is the zlib format
                    more = self.read_raw(65536)
                    self.pending = data + more
                    if not more:
                        return self._end()
                    continue
                else:
                    zlib_header = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
                    z = self.z = zlib.decompressobj(15 if zlib_header else -15)
            elif z.eof:  # bytes after the end
                if self.coding == "deflate":
                    raise TransferCodingError("%s: bytes after the end of the coded body" % self.coding)
                z = self.z = zlib.decompressobj(47)  # the next gzip member
            try:
                out = z.decompress(data, n)
            except zlib.error:
                raise TransferCodingError("%s: the body does not decode" % self.coding) from None
            self.pending = z.unconsumed_tail or z.unused_data
            if out:
                return out
        return b""

    def _end(self) -> bytes:
        self.done = True
        z = self.z
        if z is None:
            if self.pending:  # one byte of deflate
                self.pending = b""
                raise TransferCodingError("%s: the body was cut short" % self.coding)
            return b""  # no body at all: nothing to decode
        try:
            out = z.flush()
        except zlib.error:
            raise TransferCodingError("%s: the body does not decode" % self.coding) from None
        if not z.eof:
            raise TransferCodingError("%s: the body was cut short" % self.coding)
        return out


class Connection(_OneSend, http.client.HTTPConnection):
    """HTTP to a provider."""


class SecureConnection(_OneSend, http.client.HTTPSConnection):
    """HTTPS to a provider."""


def authority(host: str, port: Optional[int] = None) -> str:
    """``host`` as a URL, a Host header or a log line names it: an IPv6 address in brackets
    (RFC 3986 3.2.2), then ``:port`` when ``port`` is given."""
    if ":" in host:
        host = "[%s]" % host
    return host if port is None else "%s:%d" % (host, port)


class EgressProxyError(OSError):
    """The egress proxy would not carry the request: it refused the CONNECT (407, 403, 502
    ...), answered it with something that is not an HTTP head, or asked an absolute-form
    request for credentials (407). An ``OSError`` whose ``strerror`` is the message, as the
    handler words an upstream that cannot be reached (a 502, ``upstream_unavailable``)."""

    def __init__(self, message: str):
        super().__init__(None, message)


class EgressProxy:
    """An HTTP proxy a provider is reached through (``upstream_proxy``, a provider's ``proxy``;
    validated by config: ``http://[user:password@]host[:port]``).

    ``name`` (host:port) is what messages say; the user info becomes ``authorization``, sent
    as ``Proxy-Authorization: Basic`` (RFC 7617; UTF-8) on each CONNECT or absolute-form
    request, and ``secrets`` (the password, as written and percent-decoded, and the Basic
    token) are scrubbed from records and log lines with the provider keys. Without a
    password the user name is the secret (a token as the user name, as some proxies take
    it: ``http://<token>@proxy:3128``), and is scrubbed in its place."""

    __slots__ = ("host", "port", "name", "authorization", "secrets")

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.name = authority(self.host, self.port)
        self.authorization = ""
        self.secrets: List[str] = []
        if parts.username is not None or parts.password is not None:
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(("%s:%s" % (urllib.parse.unquote(parts.username or ""), password))
                                     .encode("utf-8")).decode("ascii")
            self.authorization = "Basic " + token
            if password:
                self.secrets = [s for s in (password, parts.password, token) if s]
            else:
                self.secrets = [s for s in (urllib.parse.unquote(parts.username or ""), parts.username, token) if s]
            self.secrets = list(dict.fromkeys(self.secrets))

    def says(self, phrase: str) -> str:
        """A reason phrase of the proxy's, for a message: its secrets replaced by
        ``[REDACTED]`` (however short: a phrase garbled is no loss), then cut to 100
        characters. The message goes to the client in the error's body, which its SDK puts
        in an exception and a log: a proxy that echoes its credentials in its refusal (``407
        bad credentials Basic dXNlcjp...``) put them there, or, cut, a part of them that no
        scrub of the record finds."""
        return redact(phrase, self.secrets, shortest=1).strip()[:100]


def redact(text: str, secrets: Iterable[str], shortest: int = 4) -> str:
    """``text`` for a message or a log line: each of ``secrets`` of ``shortest`` characters or
    more replaced by ``[REDACTED]``, the longest first (it may hold a shorter one); a text
    garbled by a short one is no loss."""
    for secret in sorted((s for s in secrets if s and len(s) >= shortest), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


def wait_until(sock: socket.socket, deadline: float) -> None:
    """Give ``sock``'s next operations what is left until ``deadline`` (``time.monotonic``) as
    their timeout; ``socket.timeout`` if nothing is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    sock.settimeout(left)


class _Until(io.RawIOBase):
    """A socket read until ``deadline`` (``time.monotonic``), as :class:`Response` reads it
    (``makefile``): each read waits at most for what is left. A socket timeout bounds each
    read alone, so a proxy that sent its answer a byte at a time, each byte within the timeout,
    held the CONNECT (and the request, and a shutdown waiting for its connect) as long as it
    went on."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait_until(self.sock, self.deadline)
        return self.sock.recv_into(buffer)


def open_tunnel(sock: socket.socket, host: str, port: int, proxy: EgressProxy, deadline: float) -> None:
    """Ask the proxy on ``sock`` for a tunnel to ``host``:``port`` (RFC 9110 9.3.6): any 2xx
    opens it; any other answer raises :class:`EgressProxyError` naming the proxy and its
    status, a head that cannot be read too (a proxy that closes without answering, one that
    is not HTTP). The whole answer head must be in by ``deadline`` (``time.monotonic``), or
    ``socket.timeout`` is raised, however the proxy spreads it over time.

    Not ``http.client``'s ``set_tunnel``: its refusal is an ``OSError`` without a status to
    tell apart from any other, and before 3.12 it sends HTTP/1.0 without ``Host`` and an IPv6
    address without brackets, header by header. One write here; the head is read by
    :class:`Response`, with its limits."""
    target = authority(host, port)
    head = "CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (target, target)
    if proxy.authorization:
        head += "Proxy-Authorization: %s\r\n" % proxy.authorization
    sock.sendall((head + "\r\n").encode("latin-1"))
    resp = Response(_Until(sock, deadline), method="CONNECT")
    try:
        resp.begin()
    except http.client.HTTPException as exc:
        raise EgressProxyError("the egress proxy %s did not answer CONNECT with an HTTP head (%s)" % (
            proxy.name, type(exc).__name__)) from None
    finally:
        resp.close()  # (its reader only: the socket stays open, for the tunnel)
    if not 200 <= resp.status < 300:
        raise EgressProxyError("the egress proxy %s refused the tunnel: %d %s" % (
            proxy.name, resp.status, proxy.says(resp.phrase)))


class TunnelConnection(_OneSend, http.client.HTTPConnection):
    """HTTPS to ``host``:``port`` through ``proxy``'s CONNECT tunnel: connected to the proxy
    and the tunnel opened (:func:`open_tunnel`) within ``timeout`` in all, then TLS inside it,
    checked against ``host`` (not the proxy), each of its reads within what is left of it."""

    default_port = 443

    def __init__(self, host: str, port: int, proxy: EgressProxy, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout)
        self.proxy = proxy
        self.tls_context = context

    def connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        sock = socket.create_connection((self.proxy.host, self.proxy.port), self.timeout)
        try:
            open_tunnel(sock, self.host, self.port, self.proxy, deadline)
            wait_until(sock, deadline)
            self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class ForwardConnection(_OneSend, http.client.HTTPConnection):
    """HTTP through ``proxy``: connected to the proxy, each request in absolute form (the
    pool's ``target_base``; RFC 9112 3.2.2) with the proxy's ``Proxy-Authorization``. A 407
    is the proxy's (no provider asks for proxy credentials) and raises
    :class:`EgressProxyError`; any other answer is relayed as the provider's (a proxy's 403
    or 502 cannot be told apart from one the provider sent)."""

    def __init__(self, proxy: EgressProxy, timeout: float):
        super().__init__(proxy.host, proxy.port, timeout=timeout)
        self.proxy = proxy
        self.proxy_headers = [("Proxy-Authorization", proxy.authorization)] if proxy.authorization else []

    def put_headers(self, headers) -> None:
        super().put_headers(headers + self.proxy_headers if self.proxy_headers else headers)

    def getresponse(self):
        resp = super().getresponse()
        if resp.status == 407:
            raise EgressProxyError("the egress proxy %s refused the request: 407 %s" % (
                self.proxy.name, self.proxy.says(resp.phrase)))
        return resp


class UpstreamPool:
    """Idle keep-alive connections to one provider (LIFO, at most ``max_idle``)."""

    def __init__(self, base_url: str, connect_timeout: float = 10.0, max_idle: int = 64,
                 ssl_context: Optional[ssl.SSLContext] = None, ca_file: str = "", proxy: str = ""):
        """``ca_file``: a PEM bundle trusted instead of the system's (``create_default_context``
        loads the system's only when given none): a corporate CA that inspects TLS, or a
        private one. Certificates and host names are checked as ever. ``proxy``: the egress
        proxy's URL (see :class:`EgressProxy`), "" for a direct connection."""
        parts = urllib.parse.urlsplit(base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        default_port = 443 if self.scheme == "https" else 80
        self.host_header = authority(self.host, None if self.port == default_port else self.port)
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        if self.scheme == "https" and ssl_context is None:
            ssl_context = ssl.create_default_context(cafile=ca_file or None)
        self.ssl_context = ssl_context
        # The egress proxy, or None; ``via``, what an error message adds about it.
        self.proxy = EgressProxy(proxy) if proxy else None
        self.via = " via the egress proxy %s" % self.proxy.name if self.proxy is not None else ""
        # The request target's start: the base path, or through a proxy to an http provider
        # the absolute URL (RFC 9112 3.2.2).
        self.target_base = self.base_path
        if self.proxy is not None and self.scheme == "http":
            self.target_base = "http://%s%s" % (self.host_header, self.base_path)
        self._idle: Deque[Tuple[http.client.HTTPConnection, float]] = deque()  # (conn, idle since)
        self._lock = threading.Lock()  # protects _idle and _closed

        self._closed = False

    def _new(self) -> http.client.HTTPConnection:
        if self.proxy is not None:
            if self.scheme == "https":
                return TunnelConnection(self.host, self.port, self.proxy, self.connect_timeout, self.ssl_context)
            return ForwardConnection(self.proxy, self.connect_timeout)
        if self.scheme == "https":
            return SecureConnection(self.host, self.port, timeout=self.connect_timeout,
                                               context=self.ssl_context)
        return Connection(self.host, self.port, timeout=self.connect_timeout)

    def acquire(self, fresh: bool = False) -> Tuple[http.client.HTTPConnection, bool]:
        """Return (connection, reused): an idle one, or with ``fresh`` or none idle a new one
        (not connected yet)."""
        if fresh:
            return self._new(), False
        while True:
            with self._lock:
                if not self._idle:
                    return self._new(), False
                conn, idle_since = self._idle.pop()
            if conn.sock is not None and not _readable(conn.sock):
                return conn, True
            conn.close()

    def release(self, conn: http.client.HTTPConnection) -> None:
        """Give back a connection whose response was fully read."""
        if conn.sock is None:
            return
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    @staticmethod
    def discard(conn: http.client.HTTPConnection) -> None:
        try:
            conn.close()
        except OSError:
            pass

    def prune(self) -> int:
        """Close the idle connections the upstream closed (or sent stray bytes on); the
        watchdog's, every pass. Upstreams close idle keep-alive connections after a while: each
        such socket was kept, its descriptor held, until the provider's next request came to
        take it, which for a provider used once a day was up to ``max_idle`` descriptors all
        day. One ``poll`` for all of them; returns how many were closed."""
        with self._lock:
            if not self._idle:
                return 0
            dead = set(_ready([conn.sock for conn, _ in self._idle]))
            if not dead:
                return 0
            gone = [item for item in self._idle if item[0].sock in dead]
            self._idle = deque([item for item in self._idle if item[0].sock not in dead])
        for conn, _ in gone:
            self.discard(conn)
        return len(gone)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
        for conn, _ in idle:
            self.discard(conn)


def connect(conn: http.client.HTTPConnection) -> None:
    """Connect (within the connection's timeout, ``connect_timeout``), then leave the socket
    blocking, with Nagle's algorithm off: a body over ``COALESCE_MAX`` goes out in a second
    write after the head, which would otherwise wait for the ACK of the first.

    A socket with a timeout makes every send and receive two system calls (a ``poll`` first),
    each of which hands the GIL over: under load, the hand-offs cost more than the calls. The
    time limits on a blocking socket are kept by the server's watchdog instead, which cuts the
    socket (:func:`abort`) when one passes (``Exchange.upstream_deadline``)."""
    conn.connect()
    conn.sock.settimeout(None)
    try:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _readable(sock: socket.socket) -> bool:
    """True if an idle socket has something to read (EOF, a reset or stray bytes).

    ``poll`` rather than ``select``: select() cannot take descriptors past FD_SETSIZE (1024),
    which a proxy holding 2,000 streams has. A TLS socket may hold bytes the kernel no longer
    has: decrypted from the record that carried the last answer, past what it read (``pending``),
    which ``poll`` cannot see: the next client was given them (an audit's finding).
    """
    try:
        if _pending(sock):
            return True
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _pending(sock: socket.socket) -> bool:
    """Whether a TLS socket holds decrypted bytes not read yet (always False for plain TCP)."""
    pending = getattr(sock, "pending", None)
    try:
        return pending is not None and pending() > 0
    except (OSError, ValueError):
        return True


def _ready(socks: List[socket.socket]) -> List[socket.socket]:
    """Those of idle sockets ``socks`` that have something to read (see :func:`_readable`), or
    no descriptor any more."""
    ready, rest = [], []
    try:
        for sock in socks:
            (ready if sock.fileno() < 0 or _pending(sock) else rest).append(sock)
        if not rest:
            return ready
        if hasattr(select, "poll"):
            poller = select.poll()
            by_fd = {}
            for sock in rest:
                by_fd[sock.fileno()] = sock
                poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            return ready + [by_fd[fd] for fd, _ in poller.poll(0)]
        return ready + select.select(rest, [], [], 0)[0]
    except (OSError, ValueError):
        return ready


def abort(sock: Optional[socket.socket]) -> None:
    """Unblock a thread reading from or writing to the upstream socket ``sock`` (the watchdog's
    cut: shutdown, a client gone, a time limit)."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
