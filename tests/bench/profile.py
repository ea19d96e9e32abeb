"""Profile one target under load with py-spy (``pip install py-spy``; optional, bench only).

    python -m tests.bench.profile [--target rec_on] [--scenario sat16] [--seconds 5] [--top 30]

Starts the mock and the target as the benchmark does, runs the scenario's load for
``--seconds`` while ``py-spy record --format raw`` samples every thread of the
target (sampling from outside the process: no instrumentation overhead), then
prints the functions with the most samples, by self time and by inclusive time,
and the split per thread.  Idle threads (blocked in a system call with the GIL
released) are left out by py-spy unless ``--idle`` is given.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading

from tests.bench import loadgen, run
from tests.bench.targets import Mock


def summarize(raw_path: str, top: int) -> str:
    self_c = collections.Counter()
    incl = collections.Counter()
    threads = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            # py-spy --threads puts "thread (0x...)" or the thread name first
            if frames and frames[0].startswith(("thread", "process")):
                threads[frames[0]] += n
                frames = frames[1:]
            if not frames:
                continue
            self_c[_short(frames[-1])] += n
            for fr in set(_short(x) for x in frames):
                incl[fr] += n
    out = ["samples: %d" % total, "", "self:"]
    for fr, n in self_c.most_common(top):
        out.append("  %5.1f%%  %s" % (100.0 * n / total, fr))
    out += ["", "inclusive:"]
    for fr, n in incl.most_common(top):
        out.append("  %5.1f%%  %s" % (100.0 * n / total, fr))
    if threads:
        out += ["", "threads:"]
        for th, n in threads.most_common(10):
            out.append("  %5.1f%%  %s" % (100.0 * n / total, th))
    return "\n".join(out)


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"; line numbers split one function apart.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    if "/proxy_llm/" in path:
        path = "proxy_llm/" + path.split("/proxy_llm/", 1)[1]
    else:
        path = os.path.basename(path)
    return "%s (%s)" % (name, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.profile")
    ap.add_argument("--target", default="rec_on", choices=run.TARGET_NAMES[1:])
    ap.add_argument("--scenario", default="sat16", choices=("sat16", "sat64", "big", "latency", "streams"))
    ap.add_argument("--streams", type=int, default=2000, help="for --scenario streams")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--idle", action="store_true", help="include idle (blocked) samples")
    ap.add_argument("--all-threads", action="store_true",
                    help="sample every thread, not only the one holding the GIL (default: --gil,\n"
                         "which shows what the process spends its one interpreter on)")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    pyspy = shutil.which("py-spy")
    if not pyspy:
        sys.stderr.write("py-spy not found: pip install py-spy\n")
        return 2
    workdir = tempfile.mkdtemp(prefix="proxy_llm_profile_")
    mock = Mock(args.python)
    target = run.make_targets([args.target])[0]
    try:
        target.start(mock.port, workdir, args.python)
        if not target.available:
            sys.stderr.write("%s: %s\n" % (target.name, target.error))
            return 1
        h, p = target.host, target.port
        reqs = run.big_requests(h, p) if args.scenario == "big" else run.small_requests(h, p)
        conc = {"sat16": 16, "sat64": 64, "big": 16, "latency": 1, "streams": 1}[args.scenario]
        loadgen.closed_loop(h, p, reqs, conc, 0.5)  # warm up
        raw_path = os.path.join(workdir, "profile.raw")
        cmd = [pyspy, "record", "--pid", str(target.pid), "--rate", str(args.rate), "--format", "raw",
               "--output", raw_path, "--duration", str(int(args.seconds)), "--threads", "--nonblocking"]
        if args.idle:
            cmd.append("--idle")
        if not args.all_threads:
            cmd.append("--gil")
        if args.target == "workers2":
            cmd.append("--subprocesses")
        result = {}

        def load() -> None:
            if args.scenario == "streams":
                # one-second frames for as long as py-spy samples
                chunks = int(args.seconds) + 1
                raw, body = run.stream_request(h, p, chunks, 1000, 1000)
                result["tally"] = loadgen.streams(h, p, raw, body, args.streams, chunks,
                                                  chunks + 60.0, ramp=1.0)
            else:
                result["tally"] = loadgen.closed_loop(h, p, reqs, conc, args.seconds + 0.5)

        th = threading.Thread(target=load)
        th.start()
        spy = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        th.join()
        tally = result["tally"]
        print("%s %s: %.0f req/s, %d errors during the profile" % (
            args.target, args.scenario, tally.rps, tally.errors))
        if spy.returncode != 0 or not os.path.exists(raw_path):
            sys.stderr.write(spy.stderr.decode(errors="replace"))
            return 1
        print(summarize(raw_path, args.top))
    finally:
        target.stop()
        mock.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
