"""proxy_llm benchmark: one command, one table.

    python -m tests.bench [--quick] [--scenarios latency,rate50,sat16,sat64,real,sustained,big,streams,verify]
                          [--targets direct,relay,forwarder,rec_off,rec_on,rec_fsync,workers2]
                          [--streams N] [--rounds N] [--write-results]

Targets (all started at once, so that every round visits each of them):

* ``direct``    the mock upstream itself (the client's and the mock's own cost)
* ``relay``     a TCP relay, no HTTP (tests/bench/relay.py): what the extra hop and the thread
                wake-ups cost by themselves
* ``forwarder`` the bare stdlib forwarder (tests/bench/forwarder.py): the floor of this design
* ``rec_off``   proxy_llm, ``"record": false``
* ``rec_on``    proxy_llm, recording on (fsync "interval")
* ``rec_fsync`` proxy_llm, recording on, ``"fsync": "always"``
* ``workers2``  proxy_llm, recording on, ``--workers 2``

Scenarios run in rounds; inside a round the targets take turns, so drift of the
machine (other load, frequency) hits all of them alike.  Rounds come in pairs, an
order and then the same order reversed, each pair starting one place further along:
a segment runs faster right after a heavy one (direct, relay), and with a plain
rotation each target would always have the same neighbour before it (recording off
always just after the forwarder, recording on always just after recording off).
Latencies are pooled over rounds; req/s is the median of the rounds.  After each
segment the bench waits until the target is quiet (``settle``: its threads idle for
10 ms) before the next one starts; for the saturation scenarios that wait counts in
the segment's time and CPU, so a recorder that leaves records to write after the
load pays for them there ("quiet after ms", the median over rounds).  The
saturation scenarios (sat16, sat64, big) use wrk when it is on PATH
(tests/bench/wrk.py: it costs the shared cores less than the asyncio client;
``--loadgen python`` turns it off); their p50/p99 are then the median of the
rounds' own percentiles.  The 50
requests/s scenario goes further: every target gets its own 50 requests/s at the
same time, phase-shifted, so the interleaving is request by request.  Everything is measured by the client, except
CPU time per request and RSS, read from /proc for the target's process tree.
A target that fails to start shows "n/a" and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time

from tests.bench import loadgen, wrk
from tests.bench.loadgen import Tally, build_request, percentile
from tests.bench.records import check as check_records
from tests.bench.targets import Mock, Target, busy_ns, writer_ns

SCENARIOS = ("latency", "rate50", "sat16", "sat64", "real", "sustained", "big", "streams", "verify")
# The closed-loop saturation scenarios and the prefix of their figures.
SATURATION = {"sat16": "s16", "sat64": "s64", "real": "rh", "sustained": "su", "big": "big"}
TARGET_NAMES = ("direct", "relay", "forwarder", "rec_off", "rec_on", "rec_fsync", "workers2")

FULL = dict(settle_s=0.3, rounds=6, latency_s=1.0, rate_s=6.0, sat_s=1.2, big_s=1.2, sustain_s=20.0,
            streams=2000, chunks=10, interval_ms=1000, ttft_ms=1000)
QUICK = dict(settle_s=0.3, rounds=1, latency_s=0.5, rate_s=3.0, sat_s=0.7, big_s=0.7, sustain_s=2.0,
             streams=200, chunks=3, interval_ms=500, ttft_ms=500)


QUIET_WINDOW = 0.01     # seconds: settle() samples the target's threads this often...
QUIET_SHARE = 0.05      # ...and calls it quiet once they used less than this share of one core
SETTLE_MAX = 60.0


def settle(target, clock=time.monotonic, sleep=time.sleep) -> float:
    """Wait until ``target`` is quiet; return how long after the call it went quiet.

    When the load stops, a recording proxy may still hold records that its writer has not
    written: that work belongs to the requests just answered. Counting it makes the figures
    those of a proxy that keeps up (a writer that falls behind would otherwise look free for
    as long as its queue lasts, and then drop records), and waiting for it keeps it out of the
    next target's segment. Quiet: a window of ``QUIET_WINDOW`` in which the target's threads
    together used less than ``QUIET_SHARE`` of a core; the time returned is when that window
    began (0.0 when the target was quiet at once, or has no process of its own).
    """
    t0 = prev_t = clock()
    prev = target.task_cpu()
    if not prev:
        return 0.0
    while True:
        sleep(QUIET_WINDOW)
        cur = target.task_cpu()
        now = clock()
        if busy_ns(prev, cur) < QUIET_SHARE * (now - prev_t) * 1e9:
            return prev_t - t0
        if now - t0 > SETTLE_MAX:
            return now - t0
        prev, prev_t = cur, now


def round_order(targets: list, r: int) -> list:
    """The targets' turns in round ``r``: rounds come in pairs, an order and then the same
    order reversed, and each pair starts one place further along the list.

    Over a pair of rounds each target runs once just after and once just before each of its
    neighbours, so what a segment leaves behind (a busier or idler machine) does not always
    favour the same target.
    """
    k = (r // 2) % len(targets) if targets else 0
    order = targets[k:] + targets[:k]
    if r % 2:
        order.reverse()
    return order


def make_targets(names) -> list:
    table = {
        "direct": lambda: Target("direct", "direct"),
        "relay": lambda: Target("relay", "relay"),
        "forwarder": lambda: Target("forwarder", "forwarder"),
        "rec_off": lambda: Target("rec_off", "proxy", {"record": False}),
        "rec_on": lambda: Target("rec_on", "proxy", {"record": True}),
        "rec_fsync": lambda: Target("rec_fsync", "proxy", {"record": True, "fsync": "always"}),
        "workers2": lambda: Target("workers2", "proxy", {"record": True}, workers=2),
    }
    return [table[n]() for n in names]


# --- requests -------------------------------------------------------------------

def _openai(host, port, body: dict, headers=None):
    raw_body = json.dumps(body, ensure_ascii=False).encode("utf-8")
    h = {"Authorization": "Bearer sk-client-bench", "X-Session-Id": "bench"}
    h.update(headers or {})
    return build_request(host, port, "/v1/chat/completions", raw_body, h), raw_body


def _anthropic(host, port, body: dict, headers=None):
    raw_body = json.dumps(body, ensure_ascii=False).encode("utf-8")
    h = {"x-api-key": "sk-ant-client-bench", "anthropic-version": "2023-06-01",
         "X-Session-Id": "bench"}
    h.update(headers or {})
    return build_request(host, port, "/v1/messages", raw_body, h), raw_body


def small_requests(host, port) -> list:
    msgs = [{"role": "user", "content": "Say hello in one word."}]
    return [
        _openai(host, port, {"model": "gpt-bench", "messages": msgs, "max_tokens": 16}),
        _anthropic(host, port, {"model": "claude-bench", "max_tokens": 16, "messages": msgs}),
    ]


# What the official Python SDKs send besides the body and the key ({sdk}: OpenAI, Anthropic).
SDK_HEADERS = [("Accept", "application/json"), ("Accept-Encoding", "gzip, deflate"),
               ("User-Agent", "{sdk}/Python 1.97.1"), ("X-Stainless-Lang", "python"),
               ("X-Stainless-Package-Version", "1.97.1"), ("X-Stainless-OS", "Linux"), ("X-Stainless-Arch", "x64"),
               ("X-Stainless-Runtime", "CPython"), ("X-Stainless-Runtime-Version", "3.11.7"),
               ("X-Stainless-Async", "false"), ("x-stainless-retry-count", "0"), ("x-stainless-read-timeout", "600")]


def real_requests(host, port) -> list:
    """The small requests with the headers an SDK sends, answered with the headers a provider
    sends (``X-Mock-Headers: real``, see mock.PROVIDER_HEADERS): some twenty more a side."""
    msgs = [{"role": "user", "content": "Say hello in one word."}]

    def sdk(name):
        return dict([(k, v.format(sdk=name)) for k, v in SDK_HEADERS] + [("X-Mock-Headers", "real")])

    return [
        _openai(host, port, {"model": "gpt-bench", "messages": msgs, "max_tokens": 16}, sdk("OpenAI")),
        _anthropic(host, port, {"model": "claude-bench", "max_tokens": 16, "messages": msgs}, sdk("Anthropic")),
    ]


def big_requests(host, port, size=100 * 1024) -> list:
    text = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:size]
    return [_openai(host, port, {"model": "gpt-bench", "max_tokens": 16,
                                 "messages": [{"role": "user", "content": text}]})]


def agent_requests(host, port, turns=40) -> list:
    """A coding agent's request (Anthropic messages, about 60 KB): a system prompt, twenty tools
    with their JSON schemas, and a history of tool calls and their output, so a thousand-odd
    brackets, and brackets, quotes and escapes in its text."""
    tools = [{"name": "tool_%d" % i, "description": "Runs step %d; takes [paths] and {options}." % i,
              "input_schema": {"type": "object", "required": ["path"], "properties": {
                  name: {"type": "string", "description": "The %s, e.g. \"src/main.py\"." % name}
                  for name in ("path", "pattern", "command", "content", "old", "new")}}} for i in range(20)]
    messages = [{"role": "user", "content": "Fix the failing test in tests/test_app.py."}]
    for i in range(turns):
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": "Let me look at step %d." % i},
            {"type": "tool_use", "id": "toolu_%04d" % i, "name": "tool_%d" % (i % 20),
             "input": {"path": "src/app_%d.py" % i, "pattern": "def (\\w+)\\(", "options": [1, 2]}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_%04d" % i, "content": [
                {"type": "text", "text": "    if x[%d] == {\"k\": %d}:\n        return f(\"%s\")\n" % (k, k, "y" * 20)}
                for k in range(8)]}]})
    return [_anthropic(host, port, {"model": "claude-bench", "max_tokens": 1024,
                                    "system": [{"type": "text", "text": "You are a coding agent. " * 40}],
                                    "tools": tools, "messages": messages})]


def stream_request(host, port, chunks, interval_ms, ttft_ms):
    return _openai(host, port, {"model": "gpt-bench", "stream": True, "max_tokens": 64,
                                "messages": [{"role": "user", "content": "Count slowly."}]},
                   {"X-Mock-Chunks": str(chunks), "X-Mock-Interval": str(interval_ms),
                    "X-Mock-TTFT": str(ttft_ms)})


def verify_requests(host, port) -> list:
    """A mix of dialects, streams, sizes and awkward JSON, each tagged to be told apart."""
    out = []
    odd = {"text": "h\u00e9llo \u2713 \u65e5\u672c \U0001F600 \u2028 \"q\" \\ /",
           "big_int": 123456789012345678901234567890, "float": 0.1, "neg": -0.0e0,
           "nested": {"a": [1, {"b": None}], "empty": {}}}
    for k in range(2):
        tag = "v%d-" % k
        msgs = [{"role": "user", "content": "verify %d" % k}]
        out.append(_openai(host, port, {"model": "gpt-bench", "messages": msgs, "metadata": odd},
                           {"X-Mock-Tag": tag + "oa"}))
        out.append(_openai(host, port, {"model": "gpt-bench", "messages": msgs, "stream": True},
                           {"X-Mock-Tag": tag + "oas", "X-Mock-Chunks": "4"}))
        out.append(_anthropic(host, port, {"model": "claude-bench", "max_tokens": 8,
                                           "messages": msgs, "metadata": {"user_id": "u%d" % k}},
                              {"X-Mock-Tag": tag + "an"}))
        out.append(_anthropic(host, port, {"model": "claude-bench", "max_tokens": 8,
                                           "messages": msgs, "stream": True},
                              {"X-Mock-Tag": tag + "ans", "X-Mock-Chunks": "4"}))
        out.append(_openai(host, port, {"model": "gpt-bench", "messages": [
            {"role": "user", "content": "x" * (100 * 1024)}]}, {"X-Mock-Tag": tag + "big-req"}))
        out.append(_openai(host, port, {"model": "gpt-bench", "messages": msgs},
                           {"X-Mock-Tag": tag + "big-resp", "X-Mock-Size": "200000"}))
    return out


# --- the run --------------------------------------------------------------------

class RssSampler(threading.Thread):
    """Samples a target's RSS every 100 ms until stopped; keeps the maximum."""

    def __init__(self, target: Target) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.max = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            self.max = max(self.max, self.target.rss() or 0)

    def stop(self) -> int:
        self.stop_event.set()
        self.join()
        self.max = max(self.max, self.target.rss() or 0)  # a segment shorter than one period
        return self.max


class Bench:
    def __init__(self, opts) -> None:
        self.o = opts
        self.targets = make_targets(opts.targets)
        self.tallies = {}   # (scenario, target) -> Tally
        self.cpu = {}       # (scenario, target) -> CPU seconds of the target
        self.writer = {}    # (scenario, target) -> CPU ns of proxy_llm's writer thread (targets.writer_ns)
        self.extra = {}     # (key, target) -> value
        self.warm_ids = {}  # target -> record ids seen during warm-up
        self.log = opts.log

    def say(self, msg: str) -> None:
        if self.log:
            sys.stderr.write("[bench %6.1fs] %s\n" % (time.monotonic() - self.t0, msg))
            sys.stderr.flush()

    def run(self) -> dict:
        self.t0 = time.monotonic()
        _raise_nofile()
        workdir = tempfile.mkdtemp(prefix="proxy_llm_bench_")
        mock = Mock(self.o.python, procs=self.o.mock_procs)
        self.say("mock on port %d (%d processes)" % (mock.port, self.o.mock_procs))
        try:
            for t in self.targets:
                t.start(mock.port, workdir, self.o.python)
                self.say("%s: %s" % (t.name, "port %d" % t.port if t.available else t.error))
            for t in self.targets:
                if t.available:
                    self._warm(t)
            for scn in self.o.scenarios:
                if scn == "streams":
                    for t in self.targets:
                        if t.available:
                            self._streams(t)
                elif scn == "verify":
                    for t in self.targets:
                        if t.available:
                            self._segment("verify", t)
                elif scn == "sustained":  # once, and only where there are records to lose
                    for t in self.targets:
                        if t.available and t.records:
                            self._segment("sustained", t)
                    self.say("%s done" % scn)
                elif scn == "rate50":
                    for r in range(self.o.rounds):
                        self._rate50_all()
                    self.say("%s done" % scn)
                else:
                    for r in range(self.o.rounds):
                        for t in round_order(self.targets, r):
                            if t.available:
                                self._segment(scn, t)
                    self.say("%s done" % scn)
        finally:
            for t in self.targets:
                t.stop()
            mock.stop()
        for t in self.targets:
            if t.records and t.data_dir and (t.available or t.error.startswith("did not stop")):
                ids = list(self.warm_ids.get(t.name, []))
                exchanges = []
                unnamed = [0, 0]
                for (scn, name), tally in self.tallies.items():
                    if name == t.name:
                        ids.extend(tally.record_ids)
                        exchanges.extend(tally.exchanges)
                        unnamed[0] += tally.unnamed_ok
                        unnamed[1] += tally.unnamed_answered + tally.errors
                self.extra[("records", t.name)] = check_records(t.data_dir, ids, exchanges, unnamed)
        if not self.o.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            self.say("kept %s" % workdir)
        self.say("finished")
        return self.figures()

    def _warm(self, t: Target) -> None:
        tally = loadgen.closed_loop(t.host, t.port, small_requests(t.host, t.port), 4, 0.3,
                                    max_requests=400)
        self.warm_ids[t.name] = tally.record_ids
        if tally.ok == 0:
            self.say("%s: warm-up got no answer: %s" % (t.name, tally.error_samples))
        time.sleep(self.o.settle_s)  # let the warm-up's threads and buffers go away
        self.extra[("idle_rss", t.name)] = t.rss()

    def _rate50_all(self) -> None:
        """50 requests/s to every target at once, interleaved request by request."""
        live = [t for t in self.targets if t.available]
        tallies = loadgen.open_loop_multi(
            [(t.host, t.port, small_requests(t.host, t.port)) for t in live], 50.0, self.o.rate_s)
        for t, tally in zip(live, tallies):
            self.tallies.setdefault(("rate50", t.name), Tally()).merge(tally)

    def _segment(self, scn: str, t: Target) -> None:
        o = self.o
        h, p = t.host, t.port
        saturate = wrk.closed_loop if o.use_wrk else loadgen.closed_loop
        sampler = RssSampler(t) if scn in ("sat64", "sustained", "big") and t.pid else None
        if sampler:
            sampler.start()
        c0 = t.cpu()
        w0 = t.task_cpu() if t.kind == "proxy" and scn in SATURATION else None
        if scn == "latency":
            tally = loadgen.closed_loop(h, p, small_requests(h, p), 1, o.latency_s)
        elif scn == "sat16":
            tally = saturate(h, p, small_requests(h, p), 16, o.sat_s)
        elif scn == "sat64":
            tally = saturate(h, p, small_requests(h, p), 64, o.sat_s)
        elif scn == "real":
            tally = saturate(h, p, real_requests(h, p), 16, o.sat_s)
        elif scn == "sustained":  # long enough for a writer that falls behind to fill its queue
            tally = saturate(h, p, real_requests(h, p), 16, o.sustain_s)
        elif scn == "big":
            tally = saturate(h, p, big_requests(h, p), 16, o.big_s)
        elif scn == "verify":
            tally = loadgen.closed_loop(h, p, verify_requests(h, p), 1, 60.0,
                                        max_requests=len(verify_requests(h, p)), keep=True)
        else:
            raise ValueError(scn)
        drain = settle(t)
        c1 = t.cpu()  # the drain's CPU too: it is the cost of these requests
        if w0 is not None:
            self.writer[(scn, t.name)] = self.writer.get((scn, t.name), 0) + writer_ns(w0, t.task_cpu())
        if sampler:  # what the load and its backlog held at most
            key = ("peak_rss", scn, t.name)
            self.extra[key] = max(self.extra.get(key, 0), sampler.stop())
        if scn in SATURATION and tally.elapsed:
            # Throughput that includes writing the records of the requests answered.
            tally.elapsed += drain
            tally.round_rps[-1] = tally.rps
        tally.round_drain.append(drain)
        key = (scn, t.name)
        self.tallies.setdefault(key, Tally()).merge(tally)
        if c0 is not None and c1 is not None:
            self.cpu[key] = self.cpu.get(key, 0.0) + (c1 - c0)

    def _streams(self, t: Target) -> None:
        o = self.o
        raw, body = stream_request(t.host, t.port, o.chunks, o.interval_ms, o.ttft_ms)
        before = t.rss()
        sampler = RssSampler(t) if before is not None else None
        if sampler:
            sampler.start()
        timeout = (o.ttft_ms + o.chunks * o.interval_ms) / 1000.0 + 60.0
        # Starts spread over one frame interval: every stream is open at once after it,
        # and frames arrive evenly rather than in bursts of 2,000.
        tally = loadgen.streams(t.host, t.port, raw, body, o.streams, o.chunks, timeout,
                                ramp=o.interval_ms / 1000.0)
        if sampler:
            peak = sampler.stop()
            self.extra[("stream_rss", t.name)] = (peak - before) / max(1, tally.max_open)
        self.tallies[("streams", t.name)] = tally
        self.say("streams %s: ok %d lost %d in %.1fs" % (t.name, tally.streams_ok,
                                                         tally.streams_lost, tally.elapsed))

    # --- figures ----------------------------------------------------------------

    def figures(self) -> dict:
        figs = {}
        for t in self.targets:
            f = figs[t.name] = {"_error": t.error}
            if not t.available and not (t.error or "").startswith("did not stop"):
                continue
            errors = 0
            for (scn, name), tally in self.tallies.items():
                if name != t.name:
                    continue
                errors += tally.errors
                if scn in ("latency", "rate50"):
                    pre = "c1" if scn == "latency" else "r50"
                    f[pre + "_p50"] = ms(percentile(tally.lat, 50))
                    f[pre + "_p90"] = ms(percentile(tally.lat, 90))
                    f[pre + "_p99"] = ms(percentile(tally.lat, 99))
                elif scn in SATURATION:
                    pre = SATURATION[scn]
                    # The median of the rounds: one round disturbed by other work on the
                    # machine does not move it.
                    f[pre + "_rps"] = median(tally.round_rps) if tally.round_rps else tally.rps
                    if tally.round_pct:  # wrk: the median of each round's own percentiles
                        f[pre + "_p50"] = ms(median([x[0] for x in tally.round_pct]))
                        f[pre + "_p99"] = ms(median([x[2] for x in tally.round_pct]))
                    else:
                        f[pre + "_p50"] = ms(percentile(tally.lat, 50))
                        f[pre + "_p99"] = ms(percentile(tally.lat, 99))
                    if (scn, name) in self.cpu and tally.ok:
                        f[pre + "_cpu"] = 1000.0 * self.cpu[(scn, name)] / tally.ok
                    if (scn, name) in self.writer and tally.ok:
                        f[pre + "_writer"] = self.writer[(scn, name)] / 1e6 / tally.ok
                    if tally.round_drain:
                        f[pre + "_drain"] = ms(median(tally.round_drain))
                    if self.extra.get(("peak_rss", scn, name)):
                        f[pre + "_peak_rss"] = self.extra[("peak_rss", scn, name)] / 1e6
                elif scn == "streams":
                    f["st_ok"] = tally.streams_ok
                    f["st_n"] = self.o.streams
                    f["st_lost"] = tally.streams_lost
                    f["st_frames_lost"] = tally.frames_lost
                    f["st_reordered"] = tally.frames_reordered
                    f["st_open"] = tally.max_open
                    f["st_ttft_p50"] = ms(percentile(tally.ttft, 50))
                    f["st_ttft_p99"] = ms(percentile(tally.ttft, 99))
                    f["st_fd_p50"] = ms(percentile(tally.frame_delay, 50))
                    f["st_fd_p99"] = ms(percentile(tally.frame_delay, 99))
                if tally.error_samples:
                    f.setdefault("_samples", []).extend(tally.error_samples[:2])
            f["errors"] = errors
            for key in ("s16_rps", "s64_rps"):
                if key in f:
                    f["max_rps"] = max(f.get("max_rps", 0.0), f[key])
            if ("idle_rss", t.name) in self.extra and self.extra[("idle_rss", t.name)] is not None:
                f["idle_rss"] = self.extra[("idle_rss", t.name)] / 1e6
            if ("stream_rss", t.name) in self.extra:
                f["st_rss"] = self.extra[("stream_rss", t.name)] / 1024.0
            rec = self.extra.get(("records", t.name))
            if rec:
                f["rec"] = rec
        direct = figs.get("direct", {})
        for name, f in figs.items():
            if name == "direct":
                continue
            for key, base in (("c1_add_p50", "c1_p50"), ("c1_add_p99", "c1_p99"),
                              ("r50_add_p50", "r50_p50"), ("r50_add_p99", "r50_p99"),
                              ("st_add_p99", "st_fd_p99")):
                if base in f and base in direct:
                    f[key] = f[base] - direct[base]
        return figs


def median(values) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def ms(seconds: float) -> float:
    return seconds * 1000.0


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# --- the table ------------------------------------------------------------------

# (label, key, format, budget) ; budget: (kind, limit) where kind is
#   "on/fwd", "on/off", "2w/1w": the ratio must be >= limit
#   "max": every proxy target's value must be <= limit (verdict on rec_on)
#   "zero": every proxy target's value must be 0
ROWS = [
    ("1 conn: latency p50 ms", "c1_p50", "%.3f", None),
    ("1 conn: latency p99 ms", "c1_p99", "%.3f", None),
    ("1 conn: added p50 ms", "c1_add_p50", "%.3f", None),
    ("50 req/s: latency p50 ms", "r50_p50", "%.3f", None),
    ("50 req/s: latency p90 ms", "r50_p90", "%.3f", None),
    ("50 req/s: latency p99 ms", "r50_p99", "%.3f", None),
    ("50 req/s: added p50 ms", "r50_add_p50", "%.3f", ("max", 0.5)),
    ("50 req/s: added p99 ms", "r50_add_p99", "%.3f", ("max", 2.0)),
    ("16 conns: req/s", "s16_rps", "%.0f", None),
    ("16 conns: p99 ms", "s16_p99", "%.2f", None),
    ("16 conns: CPU ms/req", "s16_cpu", "%.3f", None),
    ("16 conns: writer thread CPU ms/req", "s16_writer", "%.3f", None),
    ("16 conns: quiet after ms", "s16_drain", "%.0f", None),
    ("64 conns: req/s", "s64_rps", "%.0f", None),
    ("64 conns: p99 ms", "s64_p99", "%.2f", None),
    ("64 conns: CPU ms/req", "s64_cpu", "%.3f", None),
    ("64 conns: writer thread CPU ms/req", "s64_writer", "%.3f", None),
    ("64 conns: quiet after ms", "s64_drain", "%.0f", None),
    ("64 conns: peak RSS MB", "s64_peak_rss", "%.1f", None),
    ("max req/s, small bodies", "max_rps", "%.0f", ("on/fwd", 0.85)),
    ("max req/s: recording on/off", "max_rps", "%.0f", ("on/off", 0.9)),
    ("max req/s: 2 workers / 1", "max_rps", "%.0f", ("2w/1w", 1.7)),
    ("real headers (16 conns): req/s", "rh_rps", "%.0f", None),
    ("real headers: CPU ms/req", "rh_cpu", "%.3f", None),
    ("real headers: writer thread CPU ms/req", "rh_writer", "%.3f", None),
    ("real headers: quiet after ms", "rh_drain", "%.0f", None),
    ("real headers sustained (20 s, once): req/s", "su_rps", "%.0f", None),
    ("real headers sustained: quiet after ms", "su_drain", "%.0f", None),
    ("real headers sustained: peak RSS MB", "su_peak_rss", "%.1f", None),
    ("100 KB bodies (16 conns): req/s", "big_rps", "%.0f", ("on/fwd", 0.75)),
    ("100 KB bodies: p99 ms", "big_p99", "%.2f", None),
    ("100 KB bodies: CPU ms/req", "big_cpu", "%.3f", None),
    ("100 KB bodies: writer thread CPU ms/req", "big_writer", "%.3f", None),
    ("100 KB bodies: quiet after ms", "big_drain", "%.0f", None),
    ("100 KB bodies: peak RSS MB", "big_peak_rss", "%.1f", None),
    ("streams: completed", "st_ok", "%d", None),
    ("streams: max open at once", "st_open", "%d", None),
    ("streams: lost", "st_lost", "%d", ("zero", 0)),
    ("streams: frames lost", "st_frames_lost", "%d", ("zero", 0)),
    ("streams: frames reordered", "st_reordered", "%d", ("zero", 0)),
    ("streams: TTFT p50 ms", "st_ttft_p50", "%.1f", None),
    ("streams: TTFT p99 ms", "st_ttft_p99", "%.1f", None),
    ("streams: frame delay p50 ms", "st_fd_p50", "%.2f", None),
    ("streams: frame delay p99 ms", "st_fd_p99", "%.2f", None),
    ("streams: added frame delay p99 ms", "st_add_p99", "%.2f", ("max", 10.0)),
    ("RSS per open stream KB", "st_rss", "%.1f", ("max", 64.0)),
    ("idle RSS MB", "idle_rss", "%.1f", ("max", 30.0)),
    ("errors (all scenarios)", "errors", "%d", None),
    ("records matched", "rec", None, ("records", 0)),
]


def _ratio(figs, a, b, key):
    fa, fb = figs.get(a, {}), figs.get(b, {})
    if key in fa and key in fb and fb[key]:
        return fa[key] / fb[key]
    return None


def _rec_cell(rec) -> str:
    if not rec:
        return None
    s = "%d/%d" % (rec["matched"], rec["expected"])
    if rec["content_checked"]:
        s += " +%d/%d" % (rec["content_ok"], rec["content_checked"])
    return s


def _rec_ok(rec) -> bool:
    return bool(rec) and rec["matched"] == rec["expected"] > 0 and not rec["duplicated"] \
        and rec["content_ok"] == rec["content_checked"]


def render(figs: dict, names) -> tuple:
    """Returns (markdown table, list of (budget line, verdict, detail))."""
    proxies = [n for n in names if n not in ("direct", "relay", "forwarder")]
    header = ["figure"] + list(names) + ["on/fwd", "on/off", "2w/1w", "budget", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = []
    for label, key, fmt, budget in ROWS:
        if not any(key in figs.get(n, {}) for n in names):
            continue
        cells = [label]
        for n in names:
            f = figs.get(n, {})
            if key not in f:
                cells.append("n/a")
                continue
            v = f[key]
            if key == "rec":
                cell = _rec_cell(v) or "n/a"
                if not _rec_ok(v):
                    cell += " !"
            else:
                cell = fmt % v if not (isinstance(v, float) and math.isnan(v)) else "-"
                if budget and n in proxies and budget[0] in ("max", "zero") and not _within(v, budget):
                    cell += " !"
            cells.append(cell)
        ratios = {}
        for col, (a, b) in (("on/fwd", ("rec_on", "forwarder")), ("on/off", ("rec_on", "rec_off")),
                            ("2w/1w", ("workers2", "rec_on"))):
            r = _ratio(figs, a, b, key) if key.endswith("_rps") else None
            ratios[col] = r
            cells.append("%.2f" % r if r is not None else "")
        btext, verdict = "", ""
        if budget:
            kind, limit = budget
            if kind in ratios:
                btext = "%s >= %.2f" % (kind, limit)
                r = ratios[kind]
                verdict = "n/a" if r is None else ("ok" if r >= limit else "MISS")
                detail = "%.2f" % r if r is not None else "n/a"
            elif kind == "records":
                btext = "all, exactly once, exact content"
                recs = [figs.get(n, {}).get("rec") for n in proxies if figs.get(n, {}).get("rec")]
                verdict = "n/a" if not recs else ("ok" if all(_rec_ok(r) for r in recs) else "MISS")
                detail = ", ".join(_rec_cell(r) for r in recs)
            else:
                btext = ("<= %g" % limit) if kind == "max" else "= 0"
                v = figs.get("rec_on", {}).get(key)
                verdict = "n/a" if v is None else ("ok" if _within(v, budget) else "MISS")
                detail = "rec_on " + (fmt % v if v is not None else "n/a")
            verdicts.append((label + " " + btext, verdict, detail))
        cells += [btext, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), verdicts


def _within(v, budget) -> bool:
    kind, limit = budget
    if isinstance(v, float) and math.isnan(v):
        return False
    return v <= limit if kind == "max" else v == 0


def machine() -> str:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "nproc %d, %s, Python %s (%s), Linux %s" % (
        os.cpu_count() or 0, model, platform.python_version(),
        platform.python_implementation(), platform.release())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.bench", description="proxy_llm benchmark")
    ap.add_argument("--quick", action="store_true", help="seconds-long segments, 200 streams (<= 1 min)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma list of %s" % ",".join(SCENARIOS))
    ap.add_argument("--targets", default=",".join(TARGET_NAMES),
                    help="comma list of %s" % ",".join(TARGET_NAMES))
    ap.add_argument("--streams", type=int, help="concurrent slow streams (default 2000, quick 200)")
    ap.add_argument("--chunks", type=int, help="frames per slow stream (default 10)")
    ap.add_argument("--interval-ms", type=int, help="ms between frames (default 1000)")
    ap.add_argument("--rounds", type=int,
                    help="rounds of interleaved segments (default 6: even, so each order runs both ways)")
    ap.add_argument("--mock-procs", type=int, default=2)
    ap.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                    help="saturation load: wrk if on PATH (auto), or the asyncio client")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the targets")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--write-results", action="store_true",
                    help="rewrite tests/bench/RESULTS.md with this run")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, records)")
    ap.add_argument("-q", "--silent", dest="log", action="store_false", help="no progress lines")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.loadgen == "wrk" and not wrk.path():
        ap.error("--loadgen wrk: wrk is not on PATH")
    args.use_wrk = args.loadgen != "python" and wrk.path() is not None
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.targets = [t for t in args.targets.split(",") if t]
    for s in args.scenarios:
        if s not in SCENARIOS:
            ap.error("unknown scenario %r" % s)
    for t in args.targets:
        if t not in TARGET_NAMES:
            ap.error("unknown target %r" % t)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shown = list(argv if argv is not None else sys.argv[1:])
    # The --json file is a local path: not part of the result (and RESULTS.md names no paths).
    shown = [a for i, a in enumerate(shown) if not a.startswith("--json") and (i == 0 or shown[i - 1] != "--json")]
    cmd = "python -m tests.bench " + " ".join(shown)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    figs = Bench(args).run()
    table, verdicts = render(figs, args.targets)
    load = "loadgen.py (asyncio)" + ("; saturation: %s" % wrk.version() if args.use_wrk else "")
    out = ["proxy_llm benchmark, %s; %s" % (started, machine()),
           "command: %s (%.0f s); load: %s" % (cmd.strip(), time.monotonic() - t0, load), "", table, ""]
    for name in args.targets:
        f = figs.get(name, {})
        if f.get("_error"):
            out.append("%s: n/a: %s" % (name, f["_error"]))
        for s in f.get("_samples", [])[:3]:
            out.append("%s: error sample: %s" % (name, s))
        rec = f.get("rec")
        if rec and rec["problems"]:
            out.append("%s: records: %s" % (name, "; ".join(rec["problems"][:4])))
    text = "\n".join(out)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figs, fh, indent=1, default=str)
    if args.write_results:
        write_results(text, args)
    return 0


def write_results(text: str, args) -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    head = ("# Benchmark results\n\nThe latest run of `python -m tests.bench --write-results` (see "
            "tests/bench/run.py for what each target and figure means; NOTES.md for what earlier runs found). Machine: %s.\n\n"
            "How to read it: every figure is client-observed except CPU ms/req and RSS (from /proc, "
            "summed over the target's process tree: workers2 is a parent and two workers; \"writer "
            "thread\" is the part of it proxy_llm's writer spent, with record: false its reader of "
            "answers for the token metrics, the one thread that works for every request besides "
            "the request's own). \"added\" "
            "is the target's figure minus direct's in the same run. Ratios are of req/s. A proxy cell "
            "marked `!` misses an absolute budget; the verdict column judges rec_on (one worker, "
            "recording on) or the ratio named. Load generator, mock and target share the machine's "
            "cores, and other work on the machine shows up mostly in the p99 figures. relay is a TCP "
            "relay with no HTTP at all: relay minus direct is what the extra hop and thread wake-ups "
            "cost by themselves, forwarder minus relay what the standard library's HTTP server and "
            "client cost. The 16/64-connection and 100 KB scenarios are driven by wrk when it is "
            "installed (the command line says so; tests/bench/wrk.py), and their p50/p99 are then the "
            "median of each round's own percentiles. After each segment the bench waits until the "
            "target is quiet; for the 16/64-connection and 100 KB scenarios that wait (\"quiet after "
            "ms\": a recorder still writing the records of the requests it answered) counts in the "
            "req/s and the CPU per request.\n\n"
            % machine())
    with open(path, "w") as f:
        f.write(head + "```\n" + text.split("\n\n", 1)[0] + "\n```\n\n" + text.split("\n\n", 1)[1] + "\n")


if __name__ == "__main__":
    sys.exit(main())
