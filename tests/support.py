"""Test support: a scriptable fake provider on a real socket, the proxy in-process or as a
subprocess, and helpers to read what it recorded. No sleeps: readiness and pacing use Events,
queues and deadlines.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import http.client
import http.server
import json
import os
import queue
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from proxy_llm.server import ACCEPT_WAIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DEADLINE = 20.0


class Request:
    """What the fake upstream received."""

    def __init__(self, method: str, target: str, headers: List[Tuple[str, str]], body: bytes):
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class Reply:
    """A scripted answer.

    ``body`` is bytes (sent with Content-Length unless ``chunked``) or a list of parts for a
    chunked/streamed body; a part may be a ``threading.Event`` (wait for it before going on),
    the string "RESET" (abort the connection), "CLOSE" (close without the last chunk), or
    "HANG" (stop sending and wait until the test ends).
    """

    def __init__(self, status: int = 200, headers: Sequence[Tuple[str, str]] = (), body: Union[bytes, list] = b"",
                 chunked: Optional[bool] = None, reason: Optional[str] = None, delay_headers: Optional[threading.Event] = None,
                 close_delimited: bool = False):
        self.status = status
        self.headers = list(headers)
        self.body = body
        self.chunked = isinstance(body, list) if chunked is None else chunked
        self.reason = reason
        self.delay_headers = delay_headers
        self.close_delimited = close_delimited


def json_reply(obj: Any, status: int = 200, headers: Sequence[Tuple[str, str]] = ()) -> Reply:
    return Reply(status, [("Content-Type", "application/json")] + list(headers), json.dumps(obj).encode())


def sse_reply(events: Sequence[Union[bytes, threading.Event, str]], headers: Sequence[Tuple[str, str]] = ()) -> Reply:
    return Reply(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")] + list(headers), list(events))


class ResumableUploads:
    """Gemini's Files API upload endpoint as a handler for :class:`FakeUpstream`: Google's
    resumable protocol (the Files API reference, ``media.upload``), as the Google Gen AI SDK and
    curl after Google's documentation speak it.

    * start: ``POST /upload/<version>/files`` with ``X-Goog-Upload-Protocol: resumable``,
      ``X-Goog-Upload-Command: start``, ``X-Goog-Upload-Header-Content-Length`` and ``-Type`` and
      a JSON body (``{"file": {"display_name": ...}}``) -> 200, no body, ``X-Goog-Upload-Status:
      active``, ``X-Goog-Upload-URL`` (this server's origin as the request's ``Host`` names it,
      the same path, ``upload_id=`` and ``upload_protocol=resumable``; the ``key=`` first when the
      start carried one, as Google echoes it) and ``X-Goog-Upload-Chunk-Granularity``;
    * each chunk: ``POST`` to that URL with ``X-Goog-Upload-Command: upload`` (``upload,
      finalize`` for the last) and ``X-Goog-Upload-Offset`` (the bytes sent before it) -> 200,
      ``X-Goog-Upload-Status: active``, no body; the finalize -> ``X-Goog-Upload-Status: final``
      and the file, ``{"file": {...}}``; ``query`` -> ``X-Goog-Upload-Size-Received``.

    A start with no key (``x-goog-api-key`` or ``key=``) is a 403; an unknown session, a wrong
    offset or a bad command a 400. ``files`` holds each finished file's bytes by name."""

    GRANULARITY = 8 * 1024 * 1024

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards sessions and files (the server is threaded)
        self.sessions: Dict[str, Dict[str, Any]] = {}
        self.files: Dict[str, bytes] = {}

    @staticmethod
    def error(status: int, message: str, code: str) -> Reply:
        return json_reply({"error": {"code": status, "message": message, "status": code}}, status)

    def __call__(self, req: Request) -> Reply:
        params = dict(p.partition("=")[::2] for p in req.query.split("&") if p)
        command = (req.header("X-Goog-Upload-Command") or "").lower()
        if command == "start":
            if req.header("X-Goog-Upload-Protocol") != "resumable" or not req.path.startswith("/upload/"):
                return self.error(400, "not a resumable upload", "INVALID_ARGUMENT")
            if not (req.header("x-goog-api-key") or params.get("key")):
                return self.error(403, "Method doesn't allow unregistered callers", "PERMISSION_DENIED")
            with self.lock:
                upload_id = "AHxI-upload-%d" % (len(self.sessions) + 1)
                self.sessions[upload_id] = {"parts": [], "received": 0, "meta": req.json().get("file") or {},
                                            "mime": req.header("X-Goog-Upload-Header-Content-Type")}
            query = ("key=%s&" % params["key"] if params.get("key") else "") + \
                "upload_id=%s&upload_protocol=resumable" % upload_id
            return Reply(200, [("X-GUploader-UploadID", upload_id), ("X-Goog-Upload-Status", "active"),
                               ("X-Goog-Upload-URL", "http://%s%s?%s" % (req.header("Host"), req.path, query)),
                               ("X-Goog-Upload-Chunk-Granularity", str(self.GRANULARITY)),
                               ("X-Goog-Upload-Header-Content-Length", req.header("X-Goog-Upload-Header-Content-Length") or ""),
                               ("X-Goog-Upload-Header-Content-Type", req.header("X-Goog-Upload-Header-Content-Type") or ""),
                               ("Content-Type", "text/plain; charset=utf-8")])
        with self.lock:
            session = self.sessions.get(params.get("upload_id", ""))
            if session is None:
                return self.error(400, "unknown upload session", "INVALID_ARGUMENT")
            if command == "query":
                return Reply(200, [("X-Goog-Upload-Status", "active"),
                                   ("X-Goog-Upload-Size-Received", str(session["received"]))])
            if command not in ("upload", "upload, finalize") or req.header("X-Goog-Upload-Offset") != str(session["received"]):
                return self.error(400, "bad command or offset", "INVALID_ARGUMENT")
            session["parts"].append(req.body)
            session["received"] += len(req.body)
            if command == "upload":
                return Reply(200, [("X-GUploader-UploadID", params["upload_id"]), ("X-Goog-Upload-Status", "active")])
            data = b"".join(session.pop("parts"))
            name = "files/upload%d" % (len(self.files) + 1)
            self.files[name] = data
        digest = base64.b64encode(hashlib.sha256(data).hexdigest().encode("ascii")).decode("ascii")
        file = {"name": name, "displayName": session["meta"].get("display_name") or session["meta"].get("displayName"),
                "mimeType": session["mime"], "sizeBytes": str(len(data)), "createTime": "2026-12-06T10:00:00.000000Z",
                "updateTime": "2026-12-06T10:00:00.000000Z", "expirationTime": "2026-12-08T10:00:00.000000Z",
                "sha256Hash": digest, "uri": "https://generativelanguage.googleapis.com/v1beta/" + name,
                "state": "ACTIVE", "source": "UPLOADED"}
        file = dict((k, v) for k, v in file.items() if v is not None)
        # Google's answer is indented JSON.
        return Reply(200, [("Content-Type", "application/json; charset=UTF-8"), ("X-Goog-Upload-Status", "final")],
                     json.dumps({"file": file}, indent=2).encode("utf-8"))


class FakeUpstream:
    """An HTTP/1.1 server on 127.0.0.1:0 answering with ``handler(request) -> Reply``."""

    def __init__(self, handler: Optional[Callable[[Request], Reply]] = None, tls: Optional["ssl.SSLContext"] = None):
        self.handler = handler or (lambda req: json_reply({"ok": True}))
        self.requests: "queue.Queue[Request]" = queue.Queue()
        self.connections = 0
        self.closed_by_peer = threading.Event()
        self.stop_event = threading.Event()
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def setup(self):
                upstream.connections += 1
                super().setup()

            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Request(self.command, self.path, list(self.headers.items()), body)
                upstream.requests.put(req)
                reply = upstream.handler(req)
                if reply.delay_headers is not None:
                    reply.delay_headers.wait(DEADLINE * 3)
                    if upstream.stop_event.is_set():
                        self.close_connection = True
                        return
                head = ["HTTP/1.1 %d %s" % (reply.status, reply.reason or self.responses.get(reply.status, ("X",))[0])]
                head += ["%s: %s" % kv for kv in reply.headers]
                if isinstance(reply.body, list):
                    if reply.chunked and not reply.close_delimited:
                        head.append("Transfer-Encoding: chunked")
                    else:
                        head.append("Connection: close")
                        self.close_connection = True
                else:
                    head.append("Content-Length: %d" % len(reply.body))
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
                if not isinstance(reply.body, list):
                    if self.command != "HEAD":
                        self.wfile.write(reply.body)
                    return
                framed = reply.chunked and not reply.close_delimited
                for part in reply.body:
                    if isinstance(part, threading.Event):
                        part.wait(DEADLINE * 3)
                        continue
                    if part == "RESET":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        self.close_connection = True
                        self.connection.close()
                        return
                    if part == "CLOSE":
                        self.close_connection = True
                        return
                    if part == "HANG":
                        upstream.stop_event.wait(DEADLINE * 3)
                        self.close_connection = True
                        return
                    try:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part) if framed else part)
                    except OSError:
                        upstream.closed_by_peer.set()
                        self.close_connection = True
                        return
                if framed:
                    self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = do_DELETE = do_PUT = do_HEAD = handle_any

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 1024  # the default backlog of 5 drops bursts of connects
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket.settimeout(ACCEPT_WAIT)  # (an accept of a connection gone: see server.ACCEPT_WAIT)
        if tls is not None:  # HTTPS: each accepted connection does the TLS handshake first
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = "%s://127.0.0.1:%d" % ("https" if tls is not None else "http", self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FakeUpstream":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "FakeUpstream":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(DEADLINE)

    def next_request(self, timeout: float = DEADLINE) -> Request:
        return self.requests.get(timeout=timeout)


class EgressProxy:
    """An HTTP forward proxy on 127.0.0.1:0, as on a locked-down host's way out: CONNECT
    tunnels (bytes relayed both ways until either side closes) and absolute-form requests
    (forwarded in origin form, the answer relayed as it comes). ``hosts`` maps names to the
    addresses it connects to (its own DNS: the proxy resolves, not the client).

    ``credentials`` ("user:password"), when set, is required as ``Proxy-Authorization: Basic``
    (407 otherwise); ``refuse`` (a status) answers everything with it. ``reflect``, when set,
    is the start of those refusals' reason phrase, followed by the Proxy-Authorization it got
    and the user name in it (``reflect + "Basic dXNl... user alice"``), as a proxy that
    echoes credentials would. ``seen`` holds (method, target, Proxy-Authorization or None)
    per request head; ``tunnels`` counts tunnels opened."""

    def __init__(self, credentials: Optional[str] = None, refuse: Optional[int] = None,
                 hosts: Optional[Dict[str, str]] = None, reflect: Optional[str] = None):
        self.credentials = credentials
        self.refuse = refuse
        self.reflect = reflect
        self.hosts = hosts or {}
        self.seen: List[Tuple[str, str, Optional[str]]] = []
        self.tunnels = 0
        self.lock = threading.Lock()  # protects seen, tunnels, open_socks
        self.open_socks: List[socket.socket] = []
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                proxy.track(self.connection)
                while proxy.serve_one(self.rfile, self.connection):
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.socket.settimeout(ACCEPT_WAIT)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "EgressProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            socks, self.open_socks = self.open_socks, []
        for sock in socks:  # (ends the relays)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(DEADLINE)

    def track(self, sock: socket.socket) -> None:
        with self.lock:
            self.open_socks.append(sock)

    def url_with(self, credentials: str) -> str:
        return "http://%s@127.0.0.1:%d" % (credentials, self.port)

    def serve_one(self, rfile, client: socket.socket) -> bool:
        """One request head and what follows it; False when the connection is done."""
        line = rfile.readline(65537)
        if not line:
            return False
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers = []
        while True:
            h = rfile.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        auth = header(headers, "proxy-authorization")
        with self.lock:
            self.seen.append((method, target, auth))
        expected = "Basic " + base64.b64encode(self.credentials.encode()).decode() if self.credentials else None
        if expected is not None and auth != expected:
            self.answer(client, 407, self.reason("Proxy Authentication Required", auth),
                        [("Proxy-Authenticate", 'Basic realm="corp"')])
            return False
        if self.refuse is not None:
            self.answer(client, self.refuse, self.reason(http.client.responses.get(self.refuse, "Refused"), auth), [])
            return False
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((self.hosts.get(host, host), int(port)), timeout=DEADLINE)
            self.track(upstream)
            with self.lock:
                self.tunnels += 1
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.relay(rfile, client, upstream)
            return False
        parts = urllib.parse.urlsplit(target)
        body = rfile.read(int(header(headers, "content-length") or 0))
        upstream = socket.create_connection((self.hosts.get(parts.hostname, parts.hostname), parts.port or 80),
                                            timeout=DEADLINE)
        self.track(upstream)
        kept = [(n, v) for n, v in headers if n.lower() not in ("proxy-authorization", "proxy-connection", "connection")]
        head = "%s %s HTTP/1.1\r\n" % (method, parts.path + ("?" + parts.query if parts.query else ""))
        head += "".join("%s: %s\r\n" % kv for kv in kept + [("Connection", "close")]) + "\r\n"
        upstream.sendall(head.encode("latin-1") + body)
        with upstream:
            while True:  # the answer, to the upstream's close (it was asked to)
                data = upstream.recv(65536)
                if not data:
                    return True
                client.sendall(data)

    def reason(self, standard: str, auth: Optional[str]) -> str:
        """A refusal's reason phrase: the standard one, or with ``reflect`` the credentials."""
        if self.reflect is None:
            return standard
        user = base64.b64decode(auth.split(" ", 1)[1]).decode().split(":")[0] if auth else ""
        return "%s%s user %s" % (self.reflect, auth, user)

    @staticmethod
    def answer(client: socket.socket, status: int, reason: str, headers: List[Tuple[str, str]]) -> None:
        body = b"<html>%d</html>" % status
        head = "HTTP/1.1 %d %s\r\n" % (status, reason) + "".join("%s: %s\r\n" % kv for kv in headers)
        head += "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        client.sendall(head.encode("latin-1") + body)

    @staticmethod
    def relay(rfile, client: socket.socket, upstream: socket.socket) -> None:
        """Bytes both ways until either side closes. (The client sends nothing before the
        tunnel's 200, so the reader holds nothing of it yet.)"""
        from tests.bench.relay import pump  # (the benchmark's relay: one copy of it)

        client.settimeout(None)
        upstream.settimeout(None)
        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(DEADLINE)
        upstream.close()


def base_config(providers: List[Dict[str, Any]], data_dir: str, **extra: Any) -> Dict[str, Any]:
    cfg = {"listen": "127.0.0.1:0", "data_dir": data_dir, "providers": providers}
    cfg.update(extra)
    return cfg


def provider(name: str, type_: str, url: str, api_key: str = "", models: Sequence[str] = ()) -> Dict[str, Any]:
    return {"name": name, "type": type_, "base_url": url, "api_key": api_key, "models": list(models)}


class InProcessProxy:
    """The proxy's server in this process, serving on a thread (socketless of nothing)."""

    def __init__(self, config: Dict[str, Any]):
        from proxy_llm import config as config_mod
        from proxy_llm.cli import build_server

        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_cfg_")
        path = os.path.join(self.tmp, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        self.config = config_mod.load(path, env={})
        self.server = build_server(self.config)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.data_dir = self.config.data_dir
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "InProcessProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def flush(self) -> None:
        """Wait until every exchange has ended and its record is on disk."""
        assert self.server.wait_idle(DEADLINE), "exchanges still in flight"
        if self.server.recorder is not None:
            assert self.server.recorder.flush(DEADLINE), "recorder did not flush in time"
        if self.server.tally is not None:
            assert self.server.tally.flush(DEADLINE), "the token counts were not read in time"

    def stop(self) -> None:
        if self.server.draining.is_set():
            return  # stopped already
        self.server.draining.set()
        self.server.shutdown()
        self.thread.join(DEADLINE)
        self.server.cancel_inflight()
        self.server.wait_idle(DEADLINE)
        if self.server.recorder is not None:
            self.server.recorder.close(DEADLINE)
        if self.server.tally is not None:
            self.server.tally.close(DEADLINE)
        self.server.server_close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def records(self) -> List[Dict[str, Any]]:
        self.flush()
        return read_records(self.data_dir)

    def stream_lines(self) -> List[Dict[str, Any]]:
        self.flush()
        return read_jsonl(sorted(glob.glob(os.path.join(self.data_dir, "streams", "*.jsonl"))))


def read_jsonl(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """The whole lines of JSONL files, parsed; safe while the proxy appends to them.

    A line without its newline is one still being written, and the end of what this read takes
    of the file: the file may grow while it is read, and the next "line" would be that line's
    own tail.
    """
    out = []
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                out.append(json.loads(line))
    return out


def read_records(data_dir: str) -> List[Dict[str, Any]]:
    """Every whole record line under data_dir, in request-start order."""
    recs = read_jsonl(sorted(glob.glob(os.path.join(data_dir, "session_*", "*.jsonl"))))
    return sorted(recs, key=lambda r: (r["timestamp"], r["id"]))


def all_files(root: str) -> List[str]:
    out = []
    for d, _, files in os.walk(root):
        out.extend(os.path.join(d, f) for f in files)
    return out


_LISTEN_RE = re.compile(r"listening on http://(\S+):(\d+)")


class ProxyProcess:
    """``python -m proxy_llm`` as a real subprocess; stderr is collected for inspection."""

    def __init__(self, config: Dict[str, Any], args: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
                 python: str = sys.executable, workers: int = 1, launcher: Sequence[str] = ("-m", "proxy_llm"),
                 sighup: Optional[Any] = None):
        """``sighup``: SIGHUP's disposition the process starts with (``signal.SIG_IGN`` as under
        ``nohup``, ``signal.SIG_DFL``); None: this process's own, inherited."""
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_proc_")
        self.config_path = os.path.join(self.tmp, "config.json")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self.data_dir = config.get("data_dir")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        cmd = [python] + list(launcher) + ["--config", self.config_path] + list(args)
        # Its own process group: a failed test kills the workers of --workers too, not only the
        # parent (orphaned workers would hold the output pipe and the port).
        with inherited_sighup(sighup):
            self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=full_env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.output: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ports: List[int] = []
        deadline = time.monotonic() + DEADLINE
        while len(self.ports) < workers:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError("proxy exited before listening:\n" + "".join(self.output))
            m = _LISTEN_RE.search(line)
            if m:
                self.ports.append(int(m.group(2)))
        self.port = self.ports[0]
        self.url = "http://127.0.0.1:%d" % self.port

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: str, timeout: float = DEADLINE) -> str:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        for line in list(self.output):
            if rx.search(line):
                return line
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line is None:
                raise AssertionError("proxy exited without logging %r" % pattern)
            if rx.search(line):
                return line

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            code = self.proc.wait()
        self._reader.join(DEADLINE)
        return code

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def log_text(self) -> str:
        return "".join(self.output)

    def cleanup(self) -> None:
        self.kill_group()  # the parent and any worker still running
        self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def inherited_sighup(disposition: Optional[Any]):
    """SIGHUP's disposition for the processes started in the block to inherit: an ignored signal
    stays ignored across exec (which is all ``nohup`` does), a handled one is reset to the
    default. None leaves this process's own. (Main thread only, as signal.signal is.)"""
    if disposition is None:
        yield
        return
    old = signal.signal(signal.SIGHUP, disposition)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, old)


def request(url: str, method: str = "POST", path: str = "/v1/chat/completions", body: Any = None,
            headers: Optional[Dict[str, str]] = None, timeout: float = DEADLINE) -> Tuple[int, List[Tuple[str, str]], bytes]:
    """One request on a fresh connection; returns (status, headers, body)."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def header(headers: List[Tuple[str, str]], name: str) -> Optional[str]:
    for k, v in headers:
        if k.lower() == name.lower():
            return v
    return None


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = "condition") -> None:
    """Poll a condition with a deadline (for state visible only from outside, e.g. files)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


def signal_name(sig: int) -> str:
    return signal.Signals(sig).name


def chunk_event(text: str, finish=None) -> bytes:
    """One OpenAI chat completion chunk as an SSE event."""
    obj = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o",
           "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class ProxyTestCase(unittest.TestCase):
    """A fake provider answering ``self.replies`` in order (then ``default_reply()``), a temp
    data dir, and ``start_proxy()`` for an in-process proxy in front of it."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="proxy_llm_test_")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data_dir = os.path.join(self.tmp, "data")
        self.replies: List[Reply] = []
        self.upstream = FakeUpstream(self.reply).start()
        self.addCleanup(self.upstream.stop)
        self.upstream.server.handle_error = lambda request, address: None  # cut connections are often the point

    def default_reply(self) -> Reply:
        return json_reply({"id": "x", "choices": [{"index": 0, "message": {"content": "ok"}}]})

    def reply(self, req: Request) -> Reply:
        if self.replies:
            return self.replies.pop(0)
        return self.default_reply()

    def start_proxy(self, providers=None, data_dir=None, **extra) -> InProcessProxy:
        url = self.upstream.url
        providers = providers or [provider("openai", "openai", url, "", ["gpt-*"]),
                                  provider("anthropic", "anthropic", url, "", ["claude-*"]),
                                  provider("gemini", "gemini", url, "", ["gemini-*"])]
        self.proxy = InProcessProxy(base_config(providers, data_dir or self.data_dir, **extra)).__enter__()
        self.addCleanup(self.proxy.stop)
        return self.proxy


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    """Read from a raw socket until ``marker`` has arrived (``data``: bytes already read)."""
    parts = [data]
    while marker not in data:
        more = sock.recv(65536)
        if not more:
            raise AssertionError("connection closed before %r; got %r" % (marker, data[-200:]))
        parts.append(more)
        data = b"".join(parts)
    return data


def read_to_eof(sock: socket.socket, data: bytes = b"") -> bytes:
    """Read from a raw socket until the peer closes or resets it."""
    parts = [data]
    while True:
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            break
        if not more:
            break
        parts.append(more)
    return b"".join(parts)


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return everything until the connection closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        sock.sendall(data)
        return read_to_eof(sock)
    finally:
        sock.close()


def split_at(data: bytes, points) -> List[bytes]:
    """``data`` cut at the given offsets (out-of-range and repeated offsets ignored)."""
    points = sorted(set(p for p in points if 0 < p < len(data)))
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces
