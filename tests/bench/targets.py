"""The processes under test: the mock upstream, the bare forwarder, proxy_llm variants.

Each runs as a subprocess with stderr going to a log file (a pipe nobody reads
would fill and block it); the listening port is parsed from that log.  CPU time
and RSS come from ``/proc`` and are summed over the process tree (proxy_llm with
``--workers 2`` forks).  A target that cannot start is "n/a" with a reason; it
never fails the whole run.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

LISTEN_RE = re.compile(r"listening on http://([0-9.]+):(\d+)")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def process_tree(pid: int) -> list:
    """``pid`` and all its descendants (scan of /proc)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split(b" ", 3)[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids) -> float:
    """utime + stime of the given processes (all their threads, live and exited)."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / _TICK


def task_cpu_ns(pids) -> dict:
    """(pid, tid) -> nanoseconds on a CPU, for every live thread of the given processes
    (``/proc/<pid>/task/<tid>/schedstat``; finer than the clock ticks of ``stat``)."""
    out = {}
    for pid in pids:
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tids:
            try:
                with open("/proc/%d/task/%s/schedstat" % (pid, tid), "rb") as f:
                    out[(pid, tid)] = int(f.read().split(None, 1)[0])
            except (OSError, ValueError, IndexError):
                continue
    return out


def busy_ns(before: dict, after: dict) -> int:
    """CPU time spent between two ``task_cpu_ns`` samples by the threads alive at both (a
    thread that exited in between takes its time with it, which must not read as idleness
    of the others)."""
    return sum(ns - before[key] for key, ns in after.items() if key in before)


def writer_ns(before: dict, after: dict) -> int:
    """CPU time between two ``task_cpu_ns`` samples of each process's busiest thread alive at
    both, its main thread aside, summed over the processes. In proxy_llm that is the writer
    (with ``record: false``, its reader of answers for the token metrics): the one thread that
    lives through a load and works for it; a connection's thread lives as long as its
    connection, and the main thread only accepts."""
    top: dict = {}
    for (pid, tid), ns in after.items():
        if (pid, tid) in before and tid != str(pid):
            spent = ns - before[(pid, tid)]
            if spent > top.get(pid, 0):
                top[pid] = spent
    return sum(top.values())


def rss_bytes(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/statm" % pid, "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except OSError:
            continue
    return total


def _wait_listening(proc, log_path: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(log_path, "r", errors="replace") as f:
                m = LISTEN_RE.search(f.read())
        except OSError:
            m = None
        if m:
            return m.group(1), int(m.group(2))
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    return None


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path, "r", errors="replace") as f:
            return f.read()[-n:].strip().replace("\n", " | ")
    except OSError:
        return ""


class Target:
    """One thing to send load to.  ``kind``: "direct", "relay", "forwarder" or "proxy"."""

    def __init__(self, name: str, kind: str, config: dict = None, workers: int = 1) -> None:
        self.name = name
        self.kind = kind
        self.config = config or {}
        self.workers = workers
        self.host = "127.0.0.1"
        self.port = 0
        self.proc = None
        self.pid = None
        self.error = None       # why this target is n/a
        self.data_dir = None
        self.log_path = None
        self.wrap: list = []    # a command the target runs under (tests/bench/instructions.py: valgrind)

    @property
    def records(self) -> bool:
        return self.kind == "proxy" and self.config.get("record", True)

    @property
    def available(self) -> bool:
        return self.error is None

    def start(self, mock_port: int, workdir: str, python: str, timeout: float = 20.0) -> None:
        if self.kind == "direct":
            self.port = mock_port
            return
        self.log_path = os.path.join(workdir, self.name + ".log")
        if self.kind in ("forwarder", "relay"):
            cmd = [python, "-m", "tests.bench." + self.kind, "--listen", "127.0.0.1:0",
                   "--upstream", "127.0.0.1:%d" % mock_port]
        else:
            self.data_dir = os.path.join(workdir, self.name + "_data")
            os.makedirs(self.data_dir, exist_ok=True)
            base = "http://127.0.0.1:%d" % mock_port
            cfg = {
                "listen": "127.0.0.1:0",
                "data_dir": self.data_dir,
                "log_level": "INFO",
                "providers": [
                    {"name": "openai", "type": "openai", "base_url": base,
                     "api_key": "sk-bench-openai", "models": ["gpt-*"]},
                    {"name": "anthropic", "type": "anthropic", "base_url": base,
                     "api_key": "sk-ant-bench", "models": ["claude-*"]},
                ],
            }
            cfg.update(self.config)
            cfg_path = os.path.join(workdir, self.name + ".json")
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, indent=1)
            cmd = [python, "-m", "proxy_llm", "--config", cfg_path, "--listen", "127.0.0.1:0",
                   "--data-dir", self.data_dir, "--log-level", "INFO"]
            if self.workers > 1:
                cmd += ["--workers", str(self.workers)]
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.wrap + cmd, cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        finally:
            log.close()
        addr = _wait_listening(self.proc, self.log_path, timeout)
        if addr is None:
            self.error = "did not start: " + (_tail(self.log_path) or "no output")
            self.stop()
            return
        self.host, self.port = addr
        self.pid = self.proc.pid

    def pids(self) -> list:
        return process_tree(self.pid) if self.pid else []

    def cpu(self):
        return cpu_seconds(self.pids()) if self.pid else None

    def task_cpu(self) -> dict:
        return task_cpu_ns(self.pids()) if self.pid else {}

    def rss(self):
        return rss_bytes(self.pids()) if self.pid else None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait (the proxy drains and flushes its records), then SIGKILL."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.error is None:
                self.error = "did not stop within %.0f s of SIGTERM" % timeout
            for pid in reversed(self.pids()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(5)


class Mock:
    """The mock upstream subprocess (``tests.bench.mock``)."""

    def __init__(self, python: str = sys.executable, procs: int = 2) -> None:
        self.proc = subprocess.Popen(
            [python, "-m", "tests.bench.mock", "--listen", "127.0.0.1:0", "--procs", str(procs)],
            cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        m = LISTEN_RE.search(line)
        if not m:
            self.stop()
            raise RuntimeError("mock did not start: %r" % line)
        self.port = int(m.group(2))

    def pids(self) -> list:
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()
