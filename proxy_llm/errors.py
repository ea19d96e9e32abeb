"""Errors that carry their own HTTP answer, rendered in the provider family's error shape.

The proxy answers for itself only when it must (bad request framing, no provider, upstream
unreachable or too slow, limits). Every such answer is JSON in the shape the client's SDK
already parses, so the SDK raises its usual typed exception with our message:

* OpenAI:    ``{"error": {"message", "type", "param": null, "code"}}`` (Azure OpenAI's too: the
  ``azure`` family answers in OpenAI's shape, as Azure does)
* Anthropic: ``{"type": "error", "error": {"type", "message"}}``
* Gemini:    ``{"error": {"code", "message", "status"}}``

This module imports nothing from the package.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Iterable, Optional, Tuple


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


class RequestTimeout(ProxyError):
    """The request body stopped arriving for ``client_idle_timeout`` (the SDKs retry a 408)."""
    status = 408
    kind = "request_timeout"


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
# Besides the content and embedding methods: the Batch API's (batchGenerateContent,
# asyncBatchEmbedContent) and Imagen's and Veo's (predict, predictLongRunning).
GEMINI_METHODS = frozenset(("generateContent", "streamGenerateContent", "countTokens", "embedContent",
                            "batchEmbedContents", "batchGenerateContent", "asyncBatchEmbedContent", "predict",
                            "predictLongRunning"))
_GEMINI_METHOD_RE = re.compile(r":([A-Za-z]+)\Z")


# OpenAI's own endpoints, which no other provider's API has under /v1/: the path alone places
# them (the hot path, with /v1/messages, never looks at a header). Every other /v1/ path that is
# not Anthropic's or Gemini's by its shape (/v1/models, /v1/models/<id>, /v1/files, /v1/batches,
# ...: every provider has these, or may) is placed by the request's headers (request_family).
OPENAI_PATHS = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                          "/v1/moderations", "/v1/audio/speech", "/v1/audio/transcriptions",
                          "/v1/audio/translations", "/v1/images/generations", "/v1/images/edits",
                          "/v1/images/variations"))
# The path prefixes the proxy forwards, each with the API family the prefix alone settles (None:
# the path's shape and the request's headers do, family_of). A path under none of them, or that is
# not an API version's root (``/v1beta``), is the proxy's 404. The one table of both
# the routing gate (handler) and family_of. Gemini's: the Google Gen AI SDK's api_version picks
# /v1/, /v1beta/ or /v1alpha/ (one wire format); a file upload starts at /upload/<version>/files
# and sends its chunks to the URL the start answered with (the same path, the session in the
# query); a generated file's download_uri is under /download/<version>/. Azure OpenAI's paths
# (/openai/deployments/<deployment>/..., /openai/v1/...) are the azure family's, served by azure
# providers only (handler.route).
FORWARDED_PREFIXES = (
    ("/v1/", None),
    ("/v1beta/", "gemini"), ("/v1alpha/", "gemini"),
    ("/upload/v1/", "gemini"), ("/upload/v1beta/", "gemini"), ("/upload/v1alpha/", "gemini"),
    ("/download/v1/", "gemini"), ("/download/v1beta/", "gemini"), ("/download/v1alpha/", "gemini"),
    ("/openai/", "azure"),
)
FORWARDED = tuple(prefix for prefix, _ in FORWARDED_PREFIXES)  # (str.startswith takes a tuple)
# An API version's root without its last slash (GET /v1beta) is forwarded too; /openai and the
# file prefixes' roots are no endpoint of anyone's.
FORWARDED_ROOTS = frozenset(("/v1", "/v1beta", "/v1alpha"))
_PREFIX_FAMILIES = tuple((prefix, family) for prefix, family in FORWARDED_PREFIXES if family is not None)
# The roots of the prefixes a family owns are that family's (GET /v1beta is Gemini's, as every
# path under /v1beta/ is); /v1, shared, is placed by the request's headers as /v1/ paths are.
_ROOT_FAMILIES = dict((prefix[:-1], family) for prefix, family in _PREFIX_FAMILIES if prefix[:-1] in FORWARDED_ROOTS)


def forwarded(path: str) -> bool:
    """Whether the proxy forwards a request for ``path`` (see :data:`FORWARDED_PREFIXES`)."""
    return path.startswith(FORWARDED) or path in FORWARDED_ROOTS


# A query parameter's name (what wire's credential scrub takes for one): Gemini's ?key=.
_QUERY_NAME_RE = re.compile(r"(?:^|[&;?])([^&;?=]*)=")


def family_of(path: str, headers: Optional[Iterable[Tuple[str, str]]] = None, query: str = "") -> str:
    """The provider family whose API a request belongs to, for routing and error shapes.

    The path decides when it can: ``/v1/messages*`` is Anthropic's, an :data:`OPENAI_PATHS` one
    OpenAI's, one under a prefix of :data:`FORWARDED_PREFIXES` that names a family (or that prefix's root) that family's
    (``/v1beta/*``, ``/v1alpha/*``, ``/upload/v1beta/*`` ...: Gemini's; ``/openai/*`` Azure OpenAI's), a Gemini model method
    Gemini's. Any other path is one several APIs share (``GET /v1/models`` from the Anthropic
    SDK, ``/v1/models/gemini-...`` from the Google Gen AI SDK): the request's ``headers`` and
    ``query`` decide (:func:`request_family`), OpenAI's when they are not given or say nothing.
    (The two hot paths, ``/v1/chat/completions`` and ``/v1/messages``, are settled first.)"""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path in OPENAI_PATHS:
        return "openai"
    if not path.startswith("/v1/"):
        for prefix, family in _PREFIX_FAMILIES:
            if path.startswith(prefix):
                return family
        if path in _ROOT_FAMILIES:
            return _ROOT_FAMILIES[path]
    if ":" in path:
        if ":generateContent" in path or ":streamGenerateContent" in path:
            return "gemini"
        m = _GEMINI_METHOD_RE.search(path)
        if m is not None and m.group(1) in GEMINI_METHODS:
            return "gemini"
    return "openai" if headers is None else request_family(headers, query)


def request_family(headers: Iterable[Tuple[str, str]], query: str = "") -> str:
    """The API a request's credentials and version headers say it speaks: ``anthropic-version``,
    or ``x-api-key`` without ``Authorization`` (the Anthropic SDKs), is Anthropic's;
    ``x-goog-api-key`` or a ``key=`` query parameter (the Google Gen AI SDK, curl after Google's
    documentation) Gemini's; anything else OpenAI's. ``anthropic-version`` wins: an Anthropic
    request says so explicitly, whatever else it carries."""
    x_api_key = authorization = gemini = False
    for name, _ in headers:
        name = name.lower()
        if name == "anthropic-version":
            return "anthropic"
        if name == "x-goog-api-key":
            gemini = True
        elif name == "x-api-key":
            x_api_key = True
        elif name == "authorization":
            authorization = True
    if gemini or (query and has_key_param(query)):
        return "gemini"
    if x_api_key and not authorization:
        return "anthropic"
    return "openai"


def has_key_param(query: str) -> bool:
    """Whether a query holds Gemini's ``key=`` parameter, its name read as a server reads it
    (percent-decoded: ``%6Bey=`` is ``key=``), as wire._param_name reads it for the scrub and
    wire.without_key_param (this module imports nothing from the package)."""
    for m in _QUERY_NAME_RE.finditer(query):
        name = m.group(1)
        if name.find("%") >= 0 or name.find("+") >= 0:
            name = urllib.parse.unquote_plus(name)
        if name.lower() == "key":
            return True
    return False


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
