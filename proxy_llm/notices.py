"""What an operator reads at the default log level: upstreams failing, provider keys refused.

Records and metrics say how each exchange ended; at ``log_level`` INFO nothing did, so a
mistyped ``base_url``, a wrong provider key or an egress proxy refusing the way out showed only
as 502s, 504s and 401s in the clients. Two notices, on the logger ``proxy_llm.upstream``:

* a WARNING when an exchange fails on the upstream's side (the proxy's own 502, 504 and
  fail_closed 503, a stream broken, cut for silence or ended without its terminal event):
  ``upstream openai (api.openai.com:443) unreachable: ConnectionRefusedError: [Errno 111]
  Connection refused (upstream_unavailable)``, the record's error type last;
* an INFO notice when a provider answers 401 or 403 (read from the record, on the writer):
  ``provider anthropic answered 401 (authentication_error): check its api_key``.

Each is rate-limited per (provider, kind) by the recorder's :class:`RateLimitedLog`: the first
at once, then at most one per ``INTERVAL`` seconds, saying how many were left out.

Called only from failure branches (an ``except``, an early ending, an error record): a
successful exchange never reaches this module. A line names the provider (its configured
name), its host and port and the egress proxy's (never a URL, its user info or its query), the
exception's class and its text (an ``OSError``'s: the system's or the proxy's own words; of
any other, only its class, since an ``http.client`` error may quote the upstream's bytes),
with every secret the exchange carried and every key the proxy holds replaced by
``[REDACTED]``. No header value, body or key is ever in one.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Iterable, Optional

from .storage import RateLimitedLog
from .upstream import EgressProxy, TransferCodingError, authority, redact

log = logging.getLogger("proxy_llm.upstream")

INTERVAL = 10.0  # seconds between two lines of one provider and kind
RATELOG = RateLimitedLog(log, INTERVAL)  # (a test drives its clock)

REASON_MAX = 200  # characters of an exception's text in a line
# An error type fit to be named in a line: a word (``authentication_error``, ``PERMISSION_DENIED``)
# or the record's ``http_<status>``. Anything else an upstream put there is left out.
_TYPE_RE = re.compile(r"[A-Za-z_]{1,48}\Z|http_[0-9]{3}\Z")


def where(provider) -> str:
    """``host:port`` of a provider's ``base_url`` (its scheme's port when it names none), and
    the egress proxy's ``host:port`` it is reached through: never a path, a query or user
    info. (Worked out per line: lines are few, and rate-limited.)"""
    parts = urllib.parse.urlsplit(provider.base_url)
    host = parts.hostname or ""
    text = authority(host, parts.port or (443 if parts.scheme == "https" else 80))
    if provider.proxy:
        text += " via the egress proxy " + EgressProxy(provider.proxy).name
    return text


def reason(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """An exception, short: its class and, for an ``OSError``, its text (``[Errno 111]
    Connection refused``, an SSL error's reason, an egress proxy's refusal as
    :class:`EgressProxyError` words it); of any other its class alone (``BadStatusLine``
    quotes the upstream's status line), but for a transfer coding the proxy names itself.
    ``secrets`` are replaced by ``[REDACTED]``; cut to :data:`REASON_MAX` characters."""
    name = type(exc).__name__
    if isinstance(exc, OSError):
        text = exc.strerror if exc.errno is None and exc.strerror else str(exc)
    elif isinstance(exc, TransferCodingError):
        text = str(exc)
    else:
        return name
    text = redact(text, secrets)
    return "%s: %s" % (name, text[:REASON_MAX]) if text else name


def upstream_failed(provider, kind: str, what: str, exc: Optional[BaseException] = None,
                    secrets: Iterable[str] = ()) -> bool:
    """WARN that an exchange with ``provider`` failed on the upstream's side: ``what`` (the
    proxy's own phrase: "unreachable", "stream broke" ...), then ``exc`` short (:func:`reason`),
    then ``kind``, the record's error type, which is also the rate limit's key with the provider.
    Whether a line was written."""
    name = provider.name if provider is not None else "none"
    detail = (": " + reason(exc, secrets)) if exc is not None else ""
    return RATELOG.warning((name, kind), "upstream %s (%s) %s%s (%s)", name,
                           where(provider) if provider is not None else "-", what, detail, kind)


def refusing(provider, why: str) -> bool:
    """WARN that the proxy answers 503 (``proxy_unavailable``) for itself: recording fails and
    ``on_record_error`` is fail_closed. (Rate-limited per provider, as the other lines.)"""
    name = provider.name if provider is not None else "none"
    return RATELOG.warning((name, "proxy_unavailable"), "refusing exchanges for %s with 503: %s (proxy_unavailable)",
                           name, why)


def key_refused(provider, status: int, error_type: Optional[str], secrets: Iterable[str] = ()) -> bool:
    """Tell (INFO) that ``provider`` answered 401 or 403: a wrong or missing key is the most
    common mistake in a configuration. The error type the record names is said when it is a
    plain word (:data:`_TYPE_RE`) holding none of ``secrets``; the body, a header, a key never."""
    name = provider.name if provider is not None else "none"
    kind = error_type if isinstance(error_type, str) and _TYPE_RE.match(error_type) else "http_%d" % status
    if redact(kind, secrets) != kind:
        kind = "http_%d" % status
    if provider is not None and provider.api_key:
        advice = "check its api_key"
    else:  # (the clients' own credentials go through)
        advice = "it has no api_key: check the key its clients send"
    if (provider is not None and provider.proxy and status == 403
            and urllib.parse.urlsplit(provider.base_url).scheme != "https"):
        advice += ", or whether the egress proxy refused it"  # (a proxy's 403 to an absolute-form request)
    return RATELOG.info((name, "auth"), "provider %s answered %d (%s): %s", name, status, kind, advice)
