"""Instructions and time per record the recorder's writer encodes (bench only).

    python -m tests.bench.encode [--records 2000] [--time] [--real-headers] [--agent] [--embeddings]
                                 [--stream N]

The benchmark's two small exchanges (the OpenAI chat and Anthropic messages requests that
``run.small_requests`` sends, answered as the mock answers them) are captured as the handler
captures them and encoded in a loop by an :class:`~proxy_llm.record.Encoder` set up as the
server sets it up, token metrics included. No sockets, no threads: this is the writer's own
work per record, which under load the request threads wait for (README, Performance).

By default each run goes under valgrind's callgrind twice, encoding 0 and ``--records``
records, and the difference divided by the count is the instructions per record: a figure that
does not move with the machine's load, so that two builds can be compared from one run each.
``--time`` measures microseconds per record instead (best of 7 loops; no valgrind needed).
``--agent`` encodes a coding agent's request instead (``run.agent_requests``: 60 KB, a thousand-odd
brackets), the kind of body whose nesting the encoder measures (``record.nests_within``).
``--stream N`` answers the two small requests with streams of N text events each, framed as the
mock frames them (one read per event), the kind of answer most LLM traffic gets.
``--embeddings`` encodes an embeddings exchange instead (``embeddings_answer``: 20 vectors of
1,536 floats, 670 KB), an answer the encoder parses for its token counts.
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


def embeddings_answer(vectors: int = 20, dims: int = 1536) -> bytes:
    """An OpenAI embeddings answer (floats as the API prints them, a fixed sequence)."""
    values = ["%.9f" % (((i * 7919) % 20001 - 10000) / 100000.0) for i in range(dims)]
    data = ",".join('{"object":"embedding","index":%d,"embedding":[%s]}' % (i, ",".join(values))
                    for i in range(vectors))
    return ('{"object":"list","data":[%s],"model":"text-embedding-3-small",'
            '"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (data, vectors * 5, vectors * 5)).encode()


def stream_reads(path: str, events: int) -> list:
    """The reads of a streamed answer to ``path`` with ``events`` text deltas, as the mock sends it."""
    parts = mock._OPENAI_STREAM if path == "/v1/chat/completions" else mock._ANTHROPIC_STREAM
    return [parts["head"]] + [parts["prefix"] + b"tok%d " % i + parts["suffix"] for i in range(events)] + [parts["tail"]]


def exchanges(n: int, real_headers: bool = False, agent: bool = False, embeddings: bool = False,
              stream: int = 0) -> list:
    """``n`` captured exchanges, the two small requests in turn (``real_headers``: those of the
    benchmark's "real" scenario, with the headers an SDK sends and a provider answers with;
    ``agent``: a coding agent's request, answered as a small one; ``embeddings``: an embeddings
    request and its answer)."""
    base = "http://127.0.0.1:1"
    providers = {"/v1/chat/completions": Provider("openai", "openai", base),
                 "/v1/messages": Provider("anthropic", "anthropic", base)}
    out = []
    requests = (run.agent_requests if agent else run.real_requests if real_headers else run.small_requests)(
        "127.0.0.1", 8080)
    if embeddings:
        requests = [run._openai("127.0.0.1", 8080, {"model": "text-embedding-3-small",
                                                    "input": ["text %d" % i for i in range(20)]})]
        requests = [(raw.replace(b"/v1/chat/completions", b"/v1/embeddings", 1), body) for raw, body in requests]
        providers["/v1/embeddings"] = providers["/v1/chat/completions"]
    responses = dict(_RESPONSES, **{"/v1/embeddings": (embeddings_answer(), b"")} if embeddings else {})
    t0 = time.time()
    for i in range(n):
        raw, body = requests[i % len(requests)]
        head = raw[:raw.index(b"\r\n\r\n")].decode("latin-1").split("\r\n")
        path = head[0].split(" ")[1]
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in head[1:]]
        family = providers[path].type
        ex = Exchange("POST", path, "", headers, 1 << 20)
        ex.provider = providers[path]
        ex.provider_type = ex.family = ex.provider.type
        ex.model, ex.stream = sniff(body)  # as routing sets them (ProxyHandler.route)
        if stream:
            ex.stream = True
        ex.model_label = ex.model
        ex.request.add(0.0, body)
        parts = responses[path]
        payload = parts[0] + mock.filler(64) + parts[1] if not embeddings else parts[0]
        ex.status = 200
        ex.resp_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        if real_headers:  # as the mock sends them, parsed
            block = mock.provider_headers(family, i, t0 + i * 0.0002).decode("latin-1")
            ex.resp_headers += [tuple(part.strip() for part in line.split(":", 1))
                                for line in block.split("\r\n") if line]
        if stream:
            ex.resp_headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
            for k, read in enumerate(stream_reads(path, stream)):
                ex.response.add(1.0 + k, read)
        else:
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


def loop(records: int, real_headers: bool = False, pool: int = 2000, agent: bool = False,
         embeddings: bool = False, stream: int = 0) -> None:
    """Build ``pool`` exchanges (always, so that only the encoding differs), encode ``records``."""
    exs = exchanges(max(pool, 2) if not (agent or embeddings or stream) else 20, real_headers, agent, embeddings,
                    stream)
    enc = encoder()
    for ex in exs[:2]:  # first use: memos, imports
        enc.encode(ex)
    for i in range(records):
        enc.encode(exs[i % len(exs)])


def timed(records: int, real_headers: bool = False, agent: bool = False, embeddings: bool = False,
          stream: int = 0) -> float:
    """Microseconds per record, best of 7 loops."""
    exs = exchanges(records, real_headers, agent, embeddings, stream)
    enc = encoder()
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        for ex in exs:
            enc.encode(ex)
        best = min(best, time.perf_counter() - t)
    return best / records * 1e6


def instructions(records: int, python: str, real_headers: bool = False, agent: bool = False,
                 embeddings: bool = False, stream: int = 0) -> int:
    """Instructions of one ``--loop`` run under callgrind."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + os.devnull,
           python, "-m", "tests.bench.encode", "--loop", str(records)] + (
        ["--real-headers"] if real_headers else []) + (["--agent"] if agent else []) + (
        ["--embeddings"] if embeddings else []) + (["--stream", str(stream)] if stream else [])
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
    ap.add_argument("--agent", action="store_true", help="a coding agent's request (60 KB, many brackets)")
    ap.add_argument("--embeddings", action="store_true", help="an embeddings answer (670 KB of floats)")
    ap.add_argument("--stream", type=int, default=0, metavar="N", help="streamed answers of N text events")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--loop", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop is not None:
        loop(args.loop, args.real_headers, agent=args.agent, embeddings=args.embeddings, stream=args.stream)
        return 0
    what = ("agent records" if args.agent else "embeddings records" if args.embeddings
            else "records of %d-event streams" % args.stream if args.stream
            else "records with real headers" if args.real_headers else "records")
    if args.time:
        print("encode: %.2f us per record (%d %s, best of 7)" % (
            timed(args.records, args.real_headers, args.agent, args.embeddings, args.stream), args.records, what))
        return 0
    if not shutil.which("valgrind"):
        sys.stderr.write("valgrind not found (apt-get install valgrind), or use --time\n")
        return 2
    per = (instructions(args.records, args.python, args.real_headers, args.agent, args.embeddings, args.stream)
           - instructions(0, args.python, args.real_headers, args.agent, args.embeddings, args.stream)) / args.records
    print("encode: %.0f instructions per record (%d %s, callgrind; %s)" % (
        per, args.records, what, os.path.basename(args.python)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
