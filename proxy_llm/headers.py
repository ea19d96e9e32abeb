"""A faster ``http.client.parse_headers`` for plain header blocks, identical in result.

Both sides of every exchange parse a header block: ``BaseHTTPRequestHandler.parse_request``
and ``http.client.HTTPResponse.begin`` call ``http.client.parse_headers``, which hands the block
to the ``email`` package's feed parser. Under load that is about a third of the proxy's CPU, more
than forwarding and recording together. Header blocks in LLM traffic are plain: one
``Name: value`` per line. For those, :func:`parse_headers` builds the same ``HTTPMessage`` the
email parser would (the compat32 policy: the name as it is, the value with leading blanks and
the trailing line end removed), at a fraction of the cost. Any other block (folded lines, a
line without a colon, a name that is not an HTTP token) goes to the standard parser unchanged,
so odd input is treated exactly as before.

:func:`install` puts it in place of ``http.client.parse_headers`` for the serving process (the
standard library looks it up there at call time); it is called when the server starts, never at
import. The limits (64 KiB per line, 100 headers) are the standard library's own.

This module imports nothing from the package.
"""

from __future__ import annotations

import email.parser
import http.client
import re

_ORIGINAL = http.client.parse_headers
_READ = getattr(http.client, "_read_headers", None)
# A plain header line: a field name (RFC 9110 5.1: a token), a colon, a value holding none of
# the characters the email parser splits lines on (str.splitlines: CR, LF, VT, FF, FS, GS, RS,
# NEL), and the line end.
_PLAIN = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\r\n\x0b\x0c\x1c-\x1e\x85]*)\r?\n")


def parse_headers(fp, _class=http.client.HTTPMessage):
    """Read a header block from ``fp`` and return it as an ``HTTPMessage`` (see the module)."""
    lines = _READ(fp)  # raises LineTooLong / HTTPException past the limits, as the original
    msg = _class()
    plain = _PLAIN.fullmatch
    set_raw = msg.set_raw
    for line in lines[:-1] if lines[-1] in (b"\r\n", b"\n") else lines:
        m = plain(line)
        if m is None:
            return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))
        set_raw(m.group(1).decode("ascii"), m.group(2).decode("iso-8859-1").lstrip(" \t"))
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
