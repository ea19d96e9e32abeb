"""``proxy_llm stats``: what a data dir holds, per session, model and provider.

For every group: requests; how they ended (``completed`` and each early
ending); HTTP errors (no status, or a status >= 400); tokens by kind (as the
upstream reported them: prompt, completion, cached, cache creation, reasoning,
total); duration and time-to-first-token p50/p95 (nearest rank, in ms; TTFT
only for streams); request and response bytes.  A ``total`` row covers the
whole data dir.

Text output is three tables (sessions, models, providers) and a footer with
what was read (files, records, torn lines skipped).  Only files named as the
recorder names them are read; any other ``*.jsonl[.gz]`` in a session directory
is skipped, counted and named (relative to the data dir).  ``--json`` prints
one JSON object instead::

    {"data_dir": ..., "read": {"files", "lines", "records", "torn", "bad_lines", "problems", "skipped_files"},
     "skipped": [file], "twins": [file], "total": GROUP, "sessions": {name: GROUP}, "models": {...}, "providers": {...}}
    GROUP = {"requests", "ended": {ending: n}, "http_errors", "status": {"2xx": n, ..., "none": n},
             "tokens": {kind: n}, "duration_ms": {"p50", "p95"}, "ttft_ms": {"p50", "p95"},
             "request_bytes", "response_bytes"}

Exit codes: 0 (an empty data dir included), 2 unreadable data dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from array import array

from proxy_llm import reader

__all__ = ["add_arguments", "run", "collect", "Group", "percentile"]

ENDINGS = reader.ENDINGS
TOKEN_KINDS = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_creation_tokens",
               "reasoning_tokens", "total_tokens")
NONE_KEY = "(none)"


def percentile(values, p: float):
    """Nearest-rank percentile of ``values`` (any order), or None when empty."""
    if not len(values):
        return None
    ordered = sorted(values)
    rank = max(int(math.ceil(p / 100.0 * len(ordered))), 1)
    return ordered[rank - 1]


def _number(value) -> bool:
    """A count, size or time a record could hold: not a bool, not NaN or infinite (1e400 reads
    as infinity), and below 10**15 (an int of 400 digits has no float)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -1e15 < value < 1e15


class Group(object):
    """Accumulated numbers of one session, model or provider (memory: 16 bytes per request)."""

    def __init__(self) -> None:
        self.requests = 0
        self.ended = {}
        self.status = {}
        self.http_errors = 0
        self.tokens = {}
        self.durations = array("d")
        self.ttfts = array("d")
        self.request_bytes = 0
        self.response_bytes = 0

    def add(self, rec: dict) -> None:
        self.requests += 1
        ended = str(rec.get("ended"))
        self.ended[ended] = self.ended.get(ended, 0) + 1
        code = rec.get("status_code")
        if isinstance(code, bool) or not isinstance(code, int):
            code = None
        klass = "%dxx" % (code // 100) if code is not None else "none"
        self.status[klass] = self.status.get(klass, 0) + 1
        if code is None or code >= 400:
            self.http_errors += 1
        tokens = rec.get("tokens_used")
        if isinstance(tokens, dict):
            for kind, value in tokens.items():
                if _number(value) and value >= 0:  # (a count below 0, in a record of a build
                    # before 2026-12-07 that took one as sent, would take the sum down)
                    self.tokens[kind] = self.tokens.get(kind, 0) + value
        if _number(rec.get("duration")):
            self.durations.append(float(rec["duration"]))
        if _number(rec.get("ttft_ms")):
            self.ttfts.append(float(rec["ttft_ms"]))
        for key in ("request_bytes", "response_bytes"):
            if _number(rec.get(key)):
                setattr(self, key, getattr(self, key) + int(rec[key]))

    def to_json(self) -> dict:
        def pct(values):
            return {"p50": percentile(values, 50), "p95": percentile(values, 95)}
        return {
            "requests": self.requests,
            "ended": dict(sorted(self.ended.items())),
            "http_errors": self.http_errors,
            "status": dict(sorted(self.status.items())),
            "tokens": dict(sorted(self.tokens.items())),
            "duration_ms": pct(self.durations),
            "ttft_ms": pct(self.ttfts),
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
        }


class Report(object):
    """Groups by session, model and provider, plus the total and the read counters."""

    def __init__(self) -> None:
        self.total = Group()
        self.sessions = {}
        self.models = {}
        self.providers = {}
        self.read = reader.ReadStats()

    def add(self, rec: dict) -> None:
        self.total.add(rec)
        for table, key in ((self.sessions, rec.get("session_id")), (self.models, rec.get("model")),
                           (self.providers, rec.get("provider"))):
            key = NONE_KEY if key is None else str(key)
            if key not in table:
                table[key] = Group()
            table[key].add(rec)


def collect(data_dir: str) -> Report:
    """Read every record of ``data_dir`` into a Report (DataDirError if unreadable)."""
    report = Report()
    for rec in reader.iter_records(data_dir, report.read):
        report.add(rec)
    return report


def _human(n) -> str:
    """12345 -> "12.3K"; None -> "-"."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return ("%d%s" % (n, unit)) if unit == "" else ("%.1f%s" % (n, unit))
        n /= 1000.0
    return str(n)


def _ms(value) -> str:
    return "-" if value is None else "%d" % round(value)


COLUMNS = (
    ("requests", lambda g: str(g.requests)),
    ("http_err", lambda g: str(g.http_errors)),
    ("aborted", lambda g: str(g.ended.get("client_aborted", 0))),
    ("refused", lambda g: str(g.ended.get("refused", 0))),
    ("up_error", lambda g: str(g.ended.get("upstream_error", 0))),
    ("up_eof", lambda g: str(g.ended.get("upstream_eof", 0))),
    ("timeout", lambda g: str(g.ended.get("timeout", 0))),
    ("shutdown", lambda g: str(g.ended.get("shutdown", 0))),
    ("prompt", lambda g: _human(g.tokens.get("prompt_tokens", 0))),
    ("compl", lambda g: _human(g.tokens.get("completion_tokens", 0))),
    ("cached", lambda g: _human(g.tokens.get("cached_tokens", 0))),
    ("cache_wr", lambda g: _human(g.tokens.get("cache_creation_tokens", 0))),
    ("reason", lambda g: _human(g.tokens.get("reasoning_tokens", 0))),
    ("dur_p50", lambda g: _ms(percentile(g.durations, 50))),
    ("dur_p95", lambda g: _ms(percentile(g.durations, 95))),
    ("ttft_p50", lambda g: _ms(percentile(g.ttfts, 50))),
    ("ttft_p95", lambda g: _ms(percentile(g.ttfts, 95))),
    ("req_B", lambda g: _human(g.request_bytes)),
    ("resp_B", lambda g: _human(g.response_bytes)),
)


def render_table(title: str, groups: dict, total: Group) -> str:
    """A fixed-width table: one row per group (most requests first) and a total row."""
    rows = [[title] + [name for name, _ in COLUMNS]]
    for key, group in sorted(groups.items(), key=lambda kv: (-kv[1].requests, kv[0])):
        rows.append([reader.shown(key)] + [fn(group) for _, fn in COLUMNS])
    rows.append(["total"] + [fn(total) for _, fn in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def skipped_names(read: reader.ReadStats, data_dir: str) -> list:
    """The files the reader skipped as not the recorder's, relative to the data dir, as text."""
    return [reader.shown(os.path.relpath(path, data_dir)) for path in read.skipped_files]


def twin_names(read: reader.ReadStats, data_dir: str) -> list:
    """The ``X.jsonl.gz`` files not read because ``X.jsonl`` is, relative to the data dir."""
    return [reader.shown(os.path.relpath(path, data_dir)) for path in read.twins]


def render_text(report: Report, data_dir: str) -> str:
    parts = ["%s: %s" % (data_dir, report.read.summary())]
    for name in skipped_names(report.read, data_dir):
        parts[0] += "\nskipped, not named as the recorder names its files: %s" % name
    for name in twin_names(report.read, data_dir):
        parts[0] += "\nread once, as the plain file beside it (a compression cut short): %s" % name
    if report.total.requests:
        parts.append(render_table("session", report.sessions, report.total))
        parts.append(render_table("model", report.models, report.total))
        parts.append(render_table("provider", report.providers, report.total))
        parts.append("durations and ttft in ms (nearest-rank percentiles); tokens as reported upstream; "
                     "http_err = no status or status >= 400")
    else:
        parts.append("no records")
    return "\n\n".join(parts) + "\n"


def render_json(report: Report, data_dir: str) -> str:
    def table(groups):
        return {k: g.to_json() for k, g in sorted(groups.items())}
    return json.dumps({
        "data_dir": data_dir,
        "read": report.read.to_json(),
        "skipped": skipped_names(report.read, data_dir),
        "twins": twin_names(report.read, data_dir),
        "total": report.total.to_json(),
        "sessions": table(report.sessions),
        "models": table(report.models),
        "providers": table(report.providers),
    }, indent=2) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add stats' options to ``parser`` (``--data-dir`` defaults to None: the config's)."""
    parser.description = ("Summarize a data dir per session, model and provider: requests, endings, "
                          "HTTP errors, tokens, duration and TTFT percentiles, bytes.")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="data dir to read (default: the configured data_dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.epilog = "Exit status: 0, or 2 when the data dir is unreadable."


def run(args, default_data_dir=None) -> int:
    """Print the stats of a data dir; 0 on success, 2 when the data dir is unreadable."""
    data_dir = args.data_dir or default_data_dir
    if not data_dir:
        sys.stderr.write("proxy_llm stats: no data dir: pass --data-dir\n")
        return 2
    try:
        report = collect(data_dir)
    except reader.DataDirError as exc:
        sys.stderr.write("proxy_llm stats: %s\n" % exc)
        return 2
    sys.stdout.write(render_json(report, data_dir) if args.json else render_text(report, data_dir))
    return 0
