"""Instructions per request, counted by valgrind's callgrind (optional, bench only).

    python -m tests.bench.instructions [--requests 1000] [--targets forwarder,rec_off,rec_on]

Seconds measured on a shared machine move with everything else it does; the instructions a
program executes do not. Each target runs under ``valgrind --tool=callgrind`` twice, once
answering no request and once ``--requests`` small requests (the benchmark's own, sent one at a
time on one keep-alive connection; the mock upstream is not under valgrind); the difference,
divided by the count, is the target's user-space instructions per request, start-up and
shutdown left out. What it leaves out too: the kernel's work in system calls, and waiting;
threads run one at a time under valgrind, so it says nothing about concurrency. It counts the
interpreter's work, which is what the code decides (README, Performance).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
import tempfile

from tests.bench import run
from tests.bench.targets import Mock

_COLLECTED = re.compile(r"Collected : (\d+)")


def count(name: str, mock: Mock, requests: int, python: str, workdir: str) -> int:
    """Instructions of one run of target ``name`` that answers ``requests`` requests."""
    target = run.make_targets([name])[0]
    out = os.path.join(workdir, "%s.%d.callgrind" % (name, requests))
    target.wrap = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out]
    target.start(mock.port, workdir, python, timeout=300.0)
    try:
        if not target.available:
            raise RuntimeError("%s: %s" % (name, target.error))
        reqs = run.small_requests(target.host, target.port)
        with socket.create_connection((target.host, target.port), timeout=120.0) as sock:
            reader = sock.makefile("rb")
            for i in range(requests):
                sock.sendall(reqs[i % len(reqs)][0])
                _read_response(reader)
    finally:
        target.stop(timeout=300.0)
    with open(target.log_path, errors="replace") as f:
        m = _COLLECTED.search(f.read())
    if m is None:
        raise RuntimeError("%s: no callgrind total in %s" % (name, target.log_path))
    return int(m.group(1))


def _read_response(reader) -> None:
    status = reader.readline()
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("unexpected answer: %r" % status[:100])
    length = None
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError("the small requests' answers have a Content-Length")
    reader.read(length)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.instructions")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--targets", default="forwarder,rec_off,rec_on")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    if not shutil.which("valgrind"):
        sys.stderr.write("valgrind not found (apt-get install valgrind)\n")
        return 2
    workdir = tempfile.mkdtemp(prefix="proxy_llm_instructions_")
    mock = Mock(args.python)
    try:
        print("instructions per request, %d small requests one at a time (callgrind; %s)" % (
            args.requests, os.path.basename(args.python)))
        for name in args.targets.split(","):
            idle = count(name, mock, 0, args.python, workdir)
            busy = count(name, mock, args.requests, args.python, workdir)
            print("  %-10s %9.0f" % (name, (busy - idle) / args.requests))
    finally:
        mock.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
