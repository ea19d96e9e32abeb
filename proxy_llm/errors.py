"""Errors that carry their own HTTP answer, rendered in the provider family's error shape.

The proxy answers for itself only when it must (bad request framing, no provider, upstream
unreachable or too slow, limits). Every such answer is JSON in the shape the client's SDK
already parses, so the SDK raises its usual typed exception with our message:

* OpenAI:    ``{"error": {"message", "type", "param": null, "code"}}``
* Anthropic: ``{"type": "error", "error": {"type", "message"}}``
* Gemini:    ``{"error": {"code", "message", "status"}}``

This module imports nothing from the package.
"""

from __future__ import annotations

import json
import re
from typing import Tuple


class ProxyError(Exception):
    """Base: ``status`` is the HTTP status, ``kind`` a stable short error type."""

    status = 500
    kind = "proxy_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ProxyError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    kind = "authentication_error"


class NotFound(ProxyError):
    status = 404
    kind = "not_found_error"


class UpgradeRefused(ProxyError):
    """A WebSocket handshake: the proxy relays HTTP only. 426 tells a client that can speak
    HTTP too (Codex's Responses WebSocket) to fall back at once."""

    status = 426
    kind = "websocket_unsupported"


class BodyTooLarge(ProxyError):
    status = 413
    kind = "request_too_large"


class UpstreamUnavailable(ProxyError):
    status = 502
    kind = "upstream_unavailable"


class UpstreamProtocolError(UpstreamUnavailable):
    """The upstream answered, but not with a head the proxy can relay: one it cannot read, a
    101 it was not asked for, a body in a transfer coding it cannot decode."""

    kind = "upstream_protocol_error"


class UpstreamTimeout(ProxyError):
    status = 504
    kind = "upstream_timeout"


class Overloaded(ProxyError):
    status = 503
    kind = "proxy_unavailable"


# A connection past max_connections: answered whole, at once, with no request read (so in no
# provider's shape), then closed.
_LIMIT_BODY = b'{"error":{"message":"proxy connection limit reached","type":"proxy_unavailable"}}'
CONNECTION_LIMIT_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s"
                           % (len(_LIMIT_BODY), _LIMIT_BODY))


_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED",
                  413: "INVALID_ARGUMENT", 426: "FAILED_PRECONDITION", 431: "INVALID_ARGUMENT", 500: "INTERNAL",
                  502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   408: "timeout_error", 413: "request_too_large", 426: "invalid_request_error",
                   431: "invalid_request_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
                   504: "timeout_error"}
_OPENAI_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                408: "timeout", 413: "invalid_request_error", 426: "invalid_request_error", 431: "invalid_request_error",
                500: "server_error", 502: "server_error", 503: "server_error", 504: "timeout"}


# The methods of Gemini's models API (``/models/<model>:<method>``). The Google Gen AI SDK sends
# them under /v1/ as well as /v1beta/ (google-genai 3.x defaults to /v1/), and a /v1/ path ending
# in one is Gemini's. Only these names: an OpenAI fine-tuned model's id holds colons too
# (/v1/models/ft:gpt-4o-mini:org:name:id).
GEMINI_METHODS = frozenset(("generateContent", "streamGenerateContent", "countTokens", "embedContent",
                            "batchEmbedContents"))
_GEMINI_METHOD_RE = re.compile(r":([A-Za-z]+)\Z")


def family_of(path: str) -> str:
    """The provider family whose API a path belongs to, for routing and error shapes."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1beta/"):
        return "gemini"
    if ":" in path:
        if ":generateContent" in path or ":streamGenerateContent" in path:
            return "gemini"
        m = _GEMINI_METHOD_RE.search(path)
        if m is not None and m.group(1) in GEMINI_METHODS:
            return "gemini"
    return "openai"


def render(family: str, status: int, message: str, kind: str = "") -> Tuple[bytes, str]:
    """Return (body, content type) for an error answer in ``family``'s shape."""
    if family == "anthropic":
        obj = {"type": "error", "error": {"type": _ANTHROPIC_TYPE.get(status, "api_error"), "message": message}}
    elif family == "gemini":
        obj = {"error": {"code": status, "message": message, "status": _GEMINI_STATUS.get(status, "UNKNOWN")}}
    else:
        obj = {"error": {"message": message, "type": _OPENAI_TYPE.get(status, "server_error"), "param": None,
                         "code": kind or None}}
    return json.dumps(obj).encode("utf-8"), "application/json"
