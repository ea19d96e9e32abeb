"""Instructions and time per record the recorder's writer encodes (bench only).

    python -m tests.bench.encode [--records 2000] [--time]

The benchmark's two small exchanges (the OpenAI chat and Anthropic messages requests that
``run.small_requests`` sends, answered as the mock answers them) are captured as the handler
captures them and encoded in a loop by an :class:`~proxy_llm.record.Encoder` set up as the
server sets it up, token metrics included. No sockets, no threads: this is the writer's own
work per record, which under load the request threads wait for (README, Performance).

By default each run goes under valgrind's callgrind twice, encoding 0 and ``--records``
records, and the difference divided by the count is the instructions per record: a figure that
does not move with the machine's load, so that two builds can be compared from one run each.
``--time`` measures microseconds per record instead (best of 7 loops; no valgrind needed).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

from proxy_llm.config import Provider
from proxy_llm.metrics import ProxyMetrics
from proxy_llm.record import Encoder, Exchange
from proxy_llm.sniff import sniff
from tests.bench import mock, run

_COLLECTED = re.compile(r"Collected : (\d+)")
_RESPONSES = {"/v1/chat/completions": mock._OPENAI_BODY, "/v1/messages": mock._ANTHROPIC_BODY}


# What the official Python SDKs add to a request, and what the providers answer with (their
# documented request-id and rate-limit headers, behind Cloudflare): with --real-headers. Values
# with {n} change from one response to the next, as they do in real traffic.
_SDK_HEADERS = [("Accept", "application/json"), ("Accept-Encoding", "gzip, deflate"), ("Connection", "keep-alive"),
                ("User-Agent", "{sdk}/Python 1.97.1"), ("X-Stainless-Lang", "python"),
                ("X-Stainless-Package-Version", "1.97.1"), ("X-Stainless-OS", "Linux"), ("X-Stainless-Arch", "x64"),
                ("X-Stainless-Runtime", "CPython"), ("X-Stainless-Runtime-Version", "3.11.7"),
                ("X-Stainless-Async", "false"), ("x-stainless-retry-count", "0"), ("x-stainless-read-timeout", "600")]
_CF = [("Server", "cloudflare"), ("CF-RAY", "8f{n:014x}-SJC"), ("CF-Cache-Status", "DYNAMIC"),
       ("Strict-Transport-Security", "max-age=31536000; includeSubDomains; preload"),
       ("X-Content-Type-Options", "nosniff"), ("Alt-Svc", 'h3=":443"; ma=86400')]
_PROVIDER_HEADERS = {
    "openai": [("Date", "{date}"), ("Connection", "keep-alive"), ("access-control-expose-headers", "X-Request-ID"),
               ("openai-organization", "user-bench"), ("openai-processing-ms", "{ms}"), ("openai-project", "proj_bench"),
               ("openai-version", "2020-10-01"), ("x-envoy-upstream-service-time", "{ms}"),
               ("x-ratelimit-limit-requests", "10000"), ("x-ratelimit-limit-tokens", "30000000"),
               ("x-ratelimit-remaining-requests", "{left}"), ("x-ratelimit-remaining-tokens", "{left}0"),
               ("x-ratelimit-reset-requests", "{ms}ms"), ("x-ratelimit-reset-tokens", "0s"),
               ("x-request-id", "req_{n:032x}"),
               ("set-cookie", "__cf_bm={n:x}; path=/; HttpOnly; Secure; SameSite=None"),
               ("set-cookie", "_cfuvid={n:x}; path=/; HttpOnly; Secure; SameSite=None")] + _CF,
    "anthropic": [("Date", "{date}"), ("Connection", "keep-alive"), ("anthropic-ratelimit-requests-limit", "4000"),
                  ("anthropic-ratelimit-requests-remaining", "{left}"),
                  ("anthropic-ratelimit-requests-reset", "2026-12-06T07:00:{s:02d}Z"),
                  ("anthropic-ratelimit-input-tokens-limit", "400000"),
                  ("anthropic-ratelimit-input-tokens-remaining", "{left}0"),
                  ("anthropic-ratelimit-output-tokens-limit", "80000"),
                  ("anthropic-ratelimit-output-tokens-remaining", "{left}"),
                  ("request-id", "req_{n:024x}"), ("anthropic-organization-id", "org-bench"), ("via", "1.1 google")]
    + _CF,
}


def exchanges(n: int, real_headers: bool = False) -> list:
    """``n`` captured exchanges, the two small requests in turn (``real_headers``: with the
    headers an SDK sends and a provider answers with, see ``_PROVIDER_HEADERS``)."""
    base = "http://127.0.0.1:1"
    providers = {"/v1/chat/completions": Provider("openai", "openai", base),
                 "/v1/messages": Provider("anthropic", "anthropic", base)}
    out = []
    requests = run.small_requests("127.0.0.1", 8080)
    t0 = time.time()
    for i in range(n):
        raw, body = requests[i % len(requests)]
        head = raw[:raw.index(b"\r\n\r\n")].decode("latin-1").split("\r\n")
        path = head[0].split(" ")[1]
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in head[1:]]
        family = providers[path].type
        if real_headers:
            sdk = "OpenAI" if family == "openai" else "Anthropic"
            headers += [(name, value.format(sdk=sdk)) for name, value in _SDK_HEADERS]
        ex = Exchange("POST", path, "", headers, 1 << 20)
        ex.provider = providers[path]
        ex.provider_type = ex.family = ex.provider.type
        ex.model, ex.stream = sniff(body)  # as routing sets them (ProxyHandler.route)
        ex.model_label = ex.model
        ex.request.add(0.0, body)
        parts = _RESPONSES[path]
        payload = parts[0] + mock.filler(64) + parts[1]
        ex.status = 200
        ex.resp_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        if real_headers:
            values = {"n": 7919 * i, "ms": 200 + i % 900, "left": 9999 - i % 5000, "s": i % 60,
                      "date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(t0 + i * 0.0002))}
            ex.resp_headers += [(name, value.format(**values)) for name, value in _PROVIDER_HEADERS[family]]
        ex.response.add(1.0, payload)
        ex.wall_start = t0 + i * 0.0002  # 5,000 requests a second
        ex.duration = 1.0 + i % 7 * 0.125
        ex.assign_id()
        out.append(ex)
    return out


def encoder() -> Encoder:
    """An encoder as ``cli.build_server`` makes it, with the benchmark's provider keys."""
    metrics = ProxyMetrics(*([lambda: 0] * 5))

    def on_result(ex, ended, tokens_used):
        metrics.recorded(ended, ex.provider.name, ex.model_label, tokens_used)

    return Encoder(b"k" * 32, "x-session-id", 1 << 20, provider_keys=["sk-bench-openai", "sk-ant-bench"],
                   on_result=on_result)


def loop(records: int, real_headers: bool = False, pool: int = 2000) -> None:
    """Build ``pool`` exchanges (always, so that only the encoding differs), encode ``records``."""
    exs = exchanges(max(pool, 2), real_headers)
    enc = encoder()
    for ex in exs[:2]:  # first use: memos, imports
        enc.encode(ex)
    for i in range(records):
        enc.encode(exs[i % len(exs)])


def timed(records: int, real_headers: bool = False) -> float:
    """Microseconds per record, best of 7 loops."""
    exs = exchanges(records, real_headers)
    enc = encoder()
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for ex in exs:
            enc.encode(ex)
        best = min(best, time.perf_counter() - t)
    return best / records * 1e6


def instructions(records: int, python: str, real_headers: bool = False) -> int:
    """Instructions of one ``--loop`` run under callgrind."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + os.devnull,
           python, "-m", "tests.bench.encode", "--loop", str(records)] + (["--real-headers"] if real_headers else [])
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    m = _COLLECTED.search(proc.stderr.decode(errors="replace"))
    if m is None:
        raise RuntimeError("no callgrind total in its output")
    return int(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.encode")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--time", action="store_true", help="microseconds per record, no valgrind")
    ap.add_argument("--real-headers", action="store_true",
                    help="the headers an official SDK sends and a provider answers with, not the bench's few")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--loop", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop is not None:
        loop(args.loop, args.real_headers)
        return 0
    what = "records with real headers" if args.real_headers else "records"
    if args.time:
        print("encode: %.2f us per record (%d %s, best of 7)" % (timed(args.records, args.real_headers), args.records,
                                                                what))
        return 0
    if not shutil.which("valgrind"):
        sys.stderr.write("valgrind not found (apt-get install valgrind), or use --time\n")
        return 2
    per = (instructions(args.records, args.python, args.real_headers)
           - instructions(0, args.python, args.real_headers)) / args.records
    print("encode: %.0f instructions per record (%d %s, callgrind; %s)" % (
        per, args.records, what, os.path.basename(args.python)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
