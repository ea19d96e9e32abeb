"""Closed-loop saturation with ``wrk`` (Debian/Ubuntu package ``wrk``; optional, bench only).

On two cores shared by the load generator, the mock and the target, the load
generator's own CPU is taken from the target: the asyncio client of
tests/bench/loadgen.py costs ~0.05 ms per request, wrk (C, epoll) ~0.02 ms.
For one GIL-bound process that hardly matters; for ``--workers 2``, which can
use both cores, it decides the figure.  So the saturation scenarios (16 and 64
connections, 100 KB bodies) use wrk when it is on PATH; latency, 50 requests/s,
streams and the content check always use loadgen.py, which sees every response.

wrk sends the bench's own raw requests in turn (a Lua script reads them from
files) and reports, from its ``done()`` hook, the count of responses, errors by
kind and latency percentiles.  It does not see record ids: the record check
counts that every answer of a wrk segment has exactly one record, allowing one
more per connection for the requests wrk cuts when it stops (records.check's
``unnamed``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from tests.bench.loadgen import Tally

_SCRIPT = r"""
local files = {%s}
local reqs = {}
for i, path in ipairs(files) do
  local f = assert(io.open(path, "rb"))
  reqs[i] = f:read("*a")
  f:close()
end
local n = 0
request = function()
  n = n + 1
  return reqs[(n - 1) %% #reqs + 1]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\n{"requests":%%d,"duration_us":%%d,"status":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def path():
    """The wrk executable, or None."""
    return shutil.which("wrk")


def version() -> str:
    exe = path()
    if not exe:
        return ""
    out = subprocess.run([exe, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return out.stdout.decode("utf-8", "replace").split("[", 1)[0].strip()


def closed_loop(host, port, reqs, concurrency, duration) -> Tally:
    """``concurrency`` keep-alive connections for ``duration`` seconds, cycling through ``reqs``
    (a list of (raw request, body)); one wrk thread. The Tally has no per-request latencies:
    ``round_pct`` holds this segment's (p50, p90, p99) in seconds."""
    work = tempfile.mkdtemp(prefix="proxy_llm_wrk_")
    try:
        files = []
        for i, (raw, _) in enumerate(reqs):
            p = os.path.join(work, "req%d" % i)
            with open(p, "wb") as f:
                f.write(raw)
            files.append(p)
        script = os.path.join(work, "load.lua")
        with open(script, "w") as f:
            f.write(_SCRIPT % ", ".join(json.dumps(p) for p in files))
        cmd = [path() or "wrk", "-t1", "-c%d" % concurrency, "-d%ds" % max(1, int(round(duration))),
               "--timeout", "10s", "-s", script, "http://%s:%d/" % (host, port)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=duration + 60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tally = Tally()
    summary = None
    for line in out.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith('{"requests"'):
            summary = json.loads(line)
    if out.returncode != 0 or summary is None:
        tally.errors += 1
        tally.error_samples.append("wrk failed (%d): %s" % (out.returncode, out.stderr.decode("utf-8", "replace")[:200]))
        return tally
    failed = summary["connect"] + summary["read"] + summary["write"] + summary["timeout"]
    tally.ok = summary["requests"] - summary["status"]
    tally.errors = summary["status"] + failed
    tally.unnamed_ok = tally.ok
    # wrk stops by closing its connections, requests in flight included: each of those may
    # have reached the proxy and been recorded (as client_aborted, or completed a moment late).
    tally.unnamed_answered = summary["requests"] + concurrency
    tally.elapsed = summary["duration_us"] / 1e6
    tally.round_rps.append(tally.rps)
    tally.round_pct.append((summary["p50_us"] / 1e6, summary["p90_us"] / 1e6, summary["p99_us"] / 1e6))
    if tally.errors:
        tally.error_samples.append("wrk: %d non-2xx, %d connect, %d read, %d write, %d timeout" % (
            summary["status"], summary["connect"], summary["read"], summary["write"], summary["timeout"]))
    return tally
