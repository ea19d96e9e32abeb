"""A fake provider that replays the golden fixtures under tests/fixtures/, for SDK clients.

The client picks the answer with a test-only request header, ``X-Fixture: <dialect>/<name>``
(the SDKs let a caller add headers to any request). The answer is the fixture's own bytes,
never re-serialised:

* ``<name>.sse``: ``200 text/event-stream``, the file's bytes cut into uneven chunks (cuts fall
  inside lines, inside events and inside UTF-8 sequences), each sent as one HTTP chunk;
* ``<name>.stream.json`` / ``<name>.ndjson``: the same, as ``application/json`` /
  ``application/x-ndjson``;
* ``<name>.json``: the body with ``Content-Length``, status 200, or the error status when the
  body is an error object (see :func:`status_of`).

An unknown or missing ``X-Fixture`` gets a 404 in OpenAI's error shape, so a test that forgot
the header fails loudly instead of receiving some other fixture.

The fixture list is read from disk on every call (:func:`fixtures`), so fixtures added later
are covered without touching the tests.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

from tests.support import FIXTURES, FakeUpstream, Reply, Request

HEADER = "X-Fixture"
EXPECTED = ".expected.json"
# Longest suffix first: "x.stream.json" is a stream, not a body.
KINDS = (
    (".stream.json", "stream.json", "application/json"),
    (".ndjson", "ndjson", "application/x-ndjson"),
    (".sse", "sse", "text/event-stream"),
    (".json", "json", "application/json"),
)
# Chunk sizes cycled over a streamed body: 1 and 3 split UTF-8 sequences and "data:" prefixes,
# the larger ones split events and lines.
CHUNK_SIZES = (1, 37, 3, 200, 11, 64)


class Fixture:
    """One golden input and its expected dialect result."""

    def __init__(self, dialect: str, name: str, path: str, kind: str, content_type: str):
        self.dialect = dialect
        self.name = name
        self.path = path
        self.kind = kind
        self.content_type = content_type
        self.id = "%s/%s" % (dialect, name)
        with open(path, "rb") as f:
            self.data = f.read()
        expected_path = os.path.join(os.path.dirname(path), name + EXPECTED)
        self.expected: Optional[Dict[str, Any]] = None
        if os.path.exists(expected_path):
            with open(expected_path, encoding="utf-8") as f:
                self.expected = json.load(f)

    @property
    def streamed(self) -> bool:
        return self.kind != "json"

    @property
    def clean(self) -> bool:
        """The expected result is a whole, error-free exchange (complete, no error)."""
        return bool(self.expected) and self.expected.get("complete") is True and self.expected.get("error") is None

    @property
    def unterminated(self) -> bool:
        """An SSE stream whose last event has no closing blank line (the stream was cut inside
        it). SSE clients drop such an event (WHATWG HTML, 9.2.6: "If the file ends in the middle
        of an event, before the final empty line, the incomplete event is not dispatched")."""
        if self.kind != "sse":
            return False
        tail = self.data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return bool(tail.strip()) and not tail.endswith(b"\n\n")

    def body_json(self) -> Any:
        return json.loads(self.data.decode("utf-8")) if self.data.strip() else None

    def __repr__(self) -> str:
        return "<Fixture %s.%s>" % (self.id, self.kind)


def fixtures(dialect: str) -> List[Fixture]:
    """Every fixture of one dialect folder, sorted by file name (empty if there is none)."""
    folder = os.path.join(FIXTURES, dialect)
    out = []
    if not os.path.isdir(folder):
        return out
    for fname in sorted(os.listdir(folder)):
        if fname.startswith(".") or fname.endswith(EXPECTED):
            continue
        for suffix, kind, ctype in KINDS:
            if fname.endswith(suffix):
                out.append(Fixture(dialect, fname[:-len(suffix)], os.path.join(folder, fname), kind, ctype))
                break
    return out


def find(fixture_id: str) -> Optional[Fixture]:
    dialect, _, name = fixture_id.partition("/")
    if not dialect or "/" in name or dialect.startswith("."):
        return None
    for fx in fixtures(dialect):
        if fx.name == name:
            return fx
    return None


def status_of(body: Any) -> int:
    """The HTTP status a non-streamed fixture is served with.

    An error envelope (``{"type": "error", ...}`` from Anthropic, ``{"error": {...}}`` without a
    response ``id`` from OpenAI and Gemini) gets its ``error.code`` when that is an HTTP status
    (Gemini), else 400. Anything else, including an OpenAI Responses object whose ``status`` is
    ``failed`` (it carries an ``error`` but is a 200), gets 200.
    """
    if not isinstance(body, dict):
        return 200
    err = body.get("error")
    if body.get("type") == "error" or (isinstance(err, dict) and "id" not in body):
        code = err.get("code") if isinstance(err, dict) else None
        if isinstance(code, int) and 400 <= code <= 599:
            return code
        return 400
    return 200


def chunked(data: bytes) -> List[bytes]:
    parts, i, k = [], 0, 0
    while i < len(data):
        n = CHUNK_SIZES[k % len(CHUNK_SIZES)]
        parts.append(data[i:i + n])
        i += n
        k += 1
    return parts


def reply_for(fx: Fixture) -> Reply:
    if fx.streamed:
        return Reply(200, [("Content-Type", fx.content_type), ("Cache-Control", "no-cache")], chunked(fx.data))
    return Reply(status_of(fx.body_json()), [("Content-Type", "application/json")], fx.data)


def not_found(message: str) -> Reply:
    body = json.dumps({"error": {"message": message, "type": "not_found", "param": None, "code": None}})
    return Reply(404, [("Content-Type", "application/json")], body.encode("utf-8"))


def handle(req: Request) -> Reply:
    fixture_id = req.header(HEADER)
    if not fixture_id:
        return not_found("sdk_replay: no %s header on %s %s" % (HEADER, req.method, req.path))
    fx = find(fixture_id.strip())
    if fx is None:
        return not_found("sdk_replay: no fixture %r" % fixture_id)
    return reply_for(fx)


class ReplayUpstream(FakeUpstream):
    """A :class:`FakeUpstream` answering every request from the fixture its header names."""

    def __init__(self):
        super().__init__(handle)
        self.resets = 0
        default = self.server.handle_error

        def handle_error(request, client_address):
            # An SDK that rejects a stream (an in-band error event) closes its connection with
            # the rest unread; the reset that follows is expected, not a failure to print.
            if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                self.resets += 1
                return
            default(request, client_address)

        self.server.handle_error = handle_error
