"""A TCP relay: what an extra hop costs before any HTTP is done.

Each client connection gets its own upstream connection and two threads that copy bytes
(``recv`` then ``sendall``), Nagle off, no parsing of any kind.  It is not an HTTP proxy
(no routing, no keep-alive pooling, nothing recorded); it is a reference point for the
table: the difference between this and ``direct`` is the loopback hop and the thread
wake-ups every proxy on this machine pays; the difference between this and the bare
forwarder is what the standard library's HTTP machinery costs.

Run: ``python -m tests.bench.relay --listen 127.0.0.1:0 --upstream 127.0.0.1:PORT``;
logs ``listening on http://127.0.0.1:PORT`` to stderr.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading

from tests.bench.forwarder import parse_addresses


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Bytes from ``src`` to ``dst`` until either side closes, then both shut (the test suite's
    egress proxy relays its tunnels with this too)."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(client: socket.socket, upstream: tuple) -> None:
    try:
        up = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    for s in (client, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=pump, args=(up, client), daemon=True)
    back.start()
    pump(client, up)
    back.join()
    client.close()
    up.close()


def main(argv=None) -> int:
    (host, port), upstream = parse_addresses("python -m tests.bench.relay", argv)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)  # 2,000 streams connect at once
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        try:
            listener.shutdown(socket.SHUT_RDWR)  # unblocks accept()
        except OSError:
            pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sys.stderr.write("relay listening on http://%s:%d\n" % listener.getsockname()[:2])
    sys.stderr.flush()
    while not stop.is_set():
        try:
            client, _ = listener.accept()
        except OSError:
            break
        threading.Thread(target=_serve, args=(client, upstream), daemon=True).start()
    listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
