"""A faster ``http.client.parse_headers`` for plain header blocks, identical in result.

Both sides of every exchange parse a header block: ``BaseHTTPRequestHandler.parse_request``
and ``http.client.HTTPResponse.begin`` call ``http.client.parse_headers``, which hands the block
to the ``email`` package's feed parser. Under load that is about a third of the proxy's CPU, more
than forwarding and recording together. Header blocks in LLM traffic are plain: one
``Name: value`` per line. For those, :func:`parse_headers` builds the same ``HTTPMessage`` the
email parser would (the compat32 policy: the name as it is, the value with leading blanks and
the trailing line end removed), at a fraction of the cost: when the whole block is already in
the reader's buffer (the usual case) it is checked with one regular expression and taken with
one read, instead of line by line. Any other block (folded lines, a line without a colon, a
name that is not an HTTP token) goes to the standard parser unchanged, so odd input is treated
exactly as before.

:func:`install` puts it in place of ``http.client.parse_headers`` for the serving process (the
standard library looks it up there at call time); it is called when the server starts, never at
import. The limits (64 KiB per line, 100 headers) are the standard library's own.

This module imports nothing from the package.
"""

from __future__ import annotations

import email.feedparser
import email.parser
import http.client
import re
from typing import List, Optional, Tuple

_ORIGINAL = http.client.parse_headers
_READ = getattr(http.client, "_read_headers", None)
# A plain header block: lines of a field name (RFC 9110 5.1: a token), a colon, and a value
# holding none of the characters the email parser splits lines on (str.splitlines: CR, LF, VT,
# FF, FS, GS, RS, NEL) and no NUL (RFC 9110 5.5), each with its line end. The whole block is
# checked at once, then its fields are taken in one pass over the decoded text (leading blanks
# of the value dropped, as the email parser does). _TOKEN is a field name, in every pattern here.
_TOKEN = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]+"
_PLAIN_BLOCK = re.compile(b"(?:%s:[^\\r\\n\\x00\\x0b\\x0c\\x1c-\\x1e\\x85]*\\r?\\n)*" % _TOKEN.encode())
_MAX_BLOCK = 65536   # no line of a block this short passes the standard library's line limit
_MAX_FIELDS = getattr(http.client, "_MAXHEADERS", 100)
_FIELD = re.compile("(%s):[ \t]*([^\r\n\x00\x0b\x0c\x1c-\x1e\x85]*)\r?\n" % _TOKEN)


class StrictMessage(http.client.HTTPMessage):
    """A request's header block as the proxy reads it, whoever reads it: ``ProxyHandler``
    parses a plain request line itself, with :func:`strict_fields`, and leaves any other to the
    standard library, which reads the block with ``http.client.parse_headers(fp,
    _class=MessageClass)``; with this class :func:`parse_headers` reads it strictly too. The
    email parser took a line that is not a field line for the block's end, every field after
    it (Content-Length too) for the body, which the proxy then read as a second request and
    forwarded: a request smuggled past the check by a request line with two blanks in it."""

    strict = True


class BadHeaderLine(http.client.HTTPException):
    """A request's header line that is not a field line (see :func:`strict_fields`)."""


def parse_headers(fp, _class=http.client.HTTPMessage):
    """Read a header block from ``fp`` and return it as an ``HTTPMessage`` (see the module);
    strictly for a :class:`StrictMessage` (raises :class:`BadHeaderLine`)."""
    if getattr(_class, "strict", False):
        fields = strict_fields(fp)
        if fields is None:
            raise BadHeaderLine("Bad header line (RFC 9112 section 5)")
        return message(fields, _class)
    fields = take_fields(fp)
    if fields is not None:
        return message(fields, _class)
    return _message_of(_READ(fp), _class)  # (_READ raises past the limits, as the original)


def _message_of(lines: List[bytes], _class):
    """The ``HTTPMessage`` of a header block's lines (its blank line included, if it came)."""
    block = b"".join(lines)
    end = lines[-1] if lines else b""
    fields = _plain_fields(block[:-len(end)] if end in (b"\r\n", b"\n") else block)
    if fields is None:
        return email.parser.Parser(_class=_class).parsestr(block.decode("iso-8859-1"))
    return message(fields, _class)


def take_fields(fp) -> Optional[List[Tuple[str, str]]]:
    """The (name, value) fields of a plain header block that is in ``fp``'s buffer already,
    read from it; None, with nothing read, for any other block (see :func:`parse_headers`).

    The whole block is usually in the reader's buffer: it is taken in one read when it is
    plain and within the standard library's limits (all lines shorter than 64 KiB, fewer than
    100 fields).
    """
    peek = getattr(fp, "peek", None)
    if peek is None or _READ is None:
        return None
    buf = peek(1)
    end = buf.find(b"\r\n\r\n", 0, _MAX_BLOCK)
    if end < 0:
        return None
    block = buf[:end + 2]
    fields = _plain_fields(block) if block.count(b"\n") < _MAX_FIELDS else None
    if fields is not None:
        fp.read(end + 4)
    return fields


def _plain_fields(block: bytes) -> Optional[List[Tuple[str, str]]]:
    """The (name, value) fields of a block of plain lines (each with its line end), or None."""
    if _PLAIN_BLOCK.fullmatch(block) is None:
        return None
    return _FIELD.findall(block.decode("iso-8859-1"))


# A request's field line, strictly (RFC 9112 5): a token, the colon right after it, a value of
# anything but CR, LF and NUL. Not allowed: whitespace before the colon, a line folded onto the
# one before (obs-fold), a line without a colon, a name that is not a token.
_STRICT_FIELD = re.compile(b"(%s):[ \\t]*([^\\r\\n\\x00]*)\\r?\\n" % _TOKEN.encode())


def strict_fields(fp) -> Optional[List[Tuple[str, str]]]:
    """Read a request's header block from ``fp`` and return its (name, value) fields, or None
    when a line is not a field line (see ``_STRICT_FIELD``); raises as the standard library
    does past its limits.

    For a request that :func:`take_fields` does not take. The standard library's parser stops
    at the first line it cannot read as a field and quietly drops every field after it,
    Content-Length and Transfer-Encoding included: the body would then be read as the next
    request on the connection (request smuggling), so a proxy must refuse such a request. It
    also splits a value at the line ends of ``str.splitlines`` (VT, FF, NEL, ...), which a
    value may hold (NEL is byte 0x85, inside UTF-8 text): here only CR and LF end a line.
    """
    lines = _header_lines(fp)
    fields = []
    for line in lines:
        if line in (b"\r\n", b"\n"):
            break
        m = _STRICT_FIELD.fullmatch(line)
        if m is None:
            return None
        fields.append((m.group(1).decode("ascii"), m.group(2).decode("iso-8859-1")))
    return fields


def _header_lines(fp) -> List[bytes]:
    """The lines of a header block, its blank line included, within the standard library's
    limits (its own reader where it has one)."""
    return _READ(fp) if _READ is not None else _read_lines(fp)


def _read_lines(fp) -> List[bytes]:
    """``http.client._read_headers`` for a standard library without it (3.8): the lines of a
    header block up to and including the blank one, within the same limits."""
    lines = []
    while True:
        line = fp.readline(http.client._MAXLINE + 1)
        if len(line) > http.client._MAXLINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > _MAX_FIELDS:
            raise http.client.HTTPException("got more than %d headers" % _MAX_FIELDS)
        if line in (b"\r\n", b"\n", b""):
            return lines


_BLANKS_BEFORE_COLON = re.compile(b"(%s)[ \\t]+:" % _TOKEN.encode())


def response_headers(fp, _class=http.client.HTTPMessage):
    """:func:`parse_headers` for a response's header block from an upstream, with the field
    lines RFC 9112 lets a proxy mend mended first: the blanks between a field's name and its
    colon are taken out (5.1: a proxy must), and a line that is not a field line at all is
    dropped alone. The email parser stopped at either and took every field after it, the
    framing ones among them, for the body. A bare CR in a line (not before its LF) is a space
    (2.2: a recipient may replace it so): the email parser ended the line there, and took the
    rest of the block for the body, or the rest of the line for a field of its own."""
    fields = take_fields(fp)
    if fields is not None:
        return message(fields, _class)
    kept = []
    for line in _header_lines(fp):
        if line in (b"\r\n", b"\n", b""):
            kept.append(line)
            break
        end = 2 if line.endswith(b"\r\n") else 1 if line.endswith(b"\n") else 0
        if line.find(b"\r", 0, len(line) - end) >= 0:
            line = line[:len(line) - end].replace(b"\r", b" ") + line[len(line) - end:]
        # (What the email parser reads as a header line: it takes any other for the end of the
        # block, and every field after it for the body.)
        if email.feedparser.headerRE.match(line.decode("iso-8859-1")) is None:
            m = _BLANKS_BEFORE_COLON.match(line)
            if m is None:
                continue  # not a field line: dropped, and the block goes on
            line = m.group(1) + b":" + line[m.end():]
        kept.append(line)
    return _message_of(kept, _class)


def message(fields: List[Tuple[str, str]], _class=http.client.HTTPMessage):
    """The ``HTTPMessage`` the email parser builds for these plain fields."""
    msg = _class()
    set_raw = msg.set_raw
    for name, value in fields:
        set_raw(name, value)
    msg.set_payload("")
    return msg


def install() -> bool:
    """Use :func:`parse_headers` for ``http.client`` and ``http.server`` in this process."""
    if _READ is None:  # a standard library without the helper: keep the original
        return False
    http.client.parse_headers = parse_headers
    return True


def uninstall() -> None:
    http.client.parse_headers = _ORIGINAL
