"""The bare stdlib forwarder: the floor of proxy_llm's design.

What proxy_llm is made of, minus everything it adds: a ``ThreadingHTTPServer``
(one thread per connection, HTTP/1.1 keep-alive, Nagle off), a pool of
``http.client`` connections to one upstream, and a ``read1`` relay (chunked
re-framing for streams).  No recording, no parsing of bodies, no metrics.
If proxy_llm is much slower than this, the cost is in what it adds.

Run: ``python -m tests.bench.forwarder --listen 127.0.0.1:0 --upstream 127.0.0.1:PORT``;
logs ``listening on http://127.0.0.1:PORT`` to stderr.
"""
from __future__ import annotations

import argparse
import http.client
import queue
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# RFC 9110 §7.6.1 hop-by-hop fields, plus the framing fields we rewrite ourselves.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization", "content-length", "host",
))


class _Conn(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        # http.client sends the request head and the body in two writes: no Nagle delay.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Pool:
    """Idle upstream connections; a connection is returned only once fully read."""

    def __init__(self, host: str, port: int, size: int = 256) -> None:
        self.host = host
        self.port = port
        self.idle = queue.LifoQueue(size)  # thread-safe; protects nothing else

    def get(self):
        try:
            return self.idle.get_nowait(), True
        except queue.Empty:
            return _Conn(self.host, self.port, timeout=120), False

    def put(self, conn) -> None:
        try:
            self.idle.put_nowait(conn)
        except queue.Full:
            conn.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive; every response is framed
    disable_nagle_algorithm = True  # ~40 ms per response otherwise (delayed ACK)
    timeout = 300                   # an idle keep-alive client does not pin a thread forever

    def log_message(self, format, *args) -> None:  # quiet: the bench reads only stderr's first line
        pass

    def do_POST(self) -> None:
        self._forward()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {}
        for k, v in self.headers.items():
            if k.lower() not in HOP_BY_HOP:
                headers[k] = v
        pool = self.server.pool
        resp = None
        conn = None
        for attempt in (0, 1):
            conn, reused = pool.get()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                if not reused or attempt:
                    self.send_response_only(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        write = self.wfile.write
        try:
            if resp.chunked or resp.length is None:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    data = resp.read1(65536)
                    if not data:
                        break
                    write(b"%x\r\n%s\r\n" % (len(data), data))
                write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(resp.length))
                self.end_headers()
                while resp.length:
                    data = resp.read1(65536)
                    if not data:  # upstream closed early; read1 closed the response
                        break
                    write(data)
                # read1 leaves a fully read response open (length 0); close it so that
                # isclosed() is true and the connection can go back to the pool.
                resp.close()
        except OSError:
            conn.close()
            self.close_connection = True
            return
        if resp.isclosed() and not resp.will_close and resp.length in (0, None):
            pool.put(conn)
        else:
            conn.close()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096  # 2,000 streams connect at once

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind's getfqdn() (reverse DNS can stall).
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def parse_addresses(prog: str, argv=None):
    """``--listen HOST:PORT --upstream HOST:PORT`` -> ((host, port), (host, port))."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--upstream", required=True, help="HOST:PORT")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    uhost, _, uport = args.upstream.rpartition(":")
    return (host, int(port)), (uhost, int(uport))


def main(argv=None) -> int:
    listen, upstream = parse_addresses("python -m tests.bench.forwarder", argv)
    server = Server(listen, Handler)
    server.pool = Pool(*upstream)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5})
    t.start()
    sys.stderr.write("forwarder listening on http://%s:%d\n" % server.server_address[:2])
    sys.stderr.flush()
    while not stop.wait(1.0):
        pass
    server.shutdown()
    t.join()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
