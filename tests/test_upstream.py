"""The upstream connection: the same request bytes as http.client's own calls, in fewer sends."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import unittest

from proxy_llm import upstream


class _CountingSocket:
    """A connected socket that counts ``sendall`` calls (http.client sends with sendall)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.sends = []

    def sendall(self, data) -> None:
        self.sends.append(bytes(data))
        self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _Sink:
    """A listening socket on port 0 that reads each accepted connection to its end."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]

    def receive(self, send) -> bytes:
        """Run ``send(port)`` (which connects once and closes) and return every byte received."""
        got = []

        def accept():
            conn, _ = self.listener.accept()
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    got.append(data)

        t = threading.Thread(target=accept)
        t.start()
        send(self.port)
        t.join(10)
        return b"".join(got)

    def close(self) -> None:
        self.listener.close()


def _stdlib_request(port, headers, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions", skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders(body or None)
    conn.close()


def _our_request(port, headers, body, counted):
    conn = upstream.Connection("127.0.0.1", port, timeout=10)
    conn.connect()
    conn.sock = _CountingSocket(conn.sock)
    counted.append(conn.sock)
    conn.putrequest("POST", "/v1/chat/completions", skip_host=True, skip_accept_encoding=True)
    conn.put_headers(headers)
    conn.send_request_body(body)
    conn.close()


class ConnectionTest(unittest.TestCase):
    HEADERS = [("Host", "api.example"), ("Content-Type", "application/json"), ("X-Latin", "caf\xe9"),
               ("Folded", "one\r\n two"), ("A", ""), ("A", "again"), ("Content-Length", "0")]

    def setUp(self):
        self.sink = _Sink()
        self.addCleanup(self.sink.close)

    def test_same_bytes_as_putheader_and_endheaders_in_one_send(self):
        for size in (0, 1, 2000, upstream.COALESCE_MAX, upstream.COALESCE_MAX + 1):
            body = bytes(random.Random(size).getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 + 1)
            body = body[:size]
            headers = self.HEADERS[:-1] + [("Content-Length", str(size))]
            with self.subTest(size=size):
                expected = self.sink.receive(lambda port: _stdlib_request(port, headers, body))
                counted = []
                got = self.sink.receive(lambda port: _our_request(port, headers, body, counted))
                self.assertEqual(got, expected)
                self.assertTrue(got.endswith(b"\r\n\r\n" + body))
                sends = counted[0].sends
                self.assertEqual(len(sends), 2 if size > upstream.COALESCE_MAX else 1, [len(s) for s in sends])

    def test_put_headers_refuses_what_putheader_refuses(self):
        bad = [("X-Injected", "a\r\nEvil: 1"), ("X-Cr", "a\rb"), ("X-Lf", "a\nb"), ("Bad:Name", "v"),
               ("Bad Name\r\n", "v"), ("", "v"), ("X-Wide", "\u65e5"), ("N\xe9", "v")]
        for name, value in bad:
            with self.subTest(name=name, value=value):
                stdlib = http.client.HTTPConnection("127.0.0.1", self.sink.port)
                stdlib.putrequest("GET", "/")
                with self.assertRaises(Exception) as theirs:
                    stdlib.putheader(name, value)
                ours = upstream.Connection("127.0.0.1", self.sink.port)
                ours.putrequest("GET", "/")
                with self.assertRaises(type(theirs.exception)):
                    ours.put_headers([("Ok", "1"), (name, value)])

    def test_random_headers_match_putheader(self):
        rnd = random.Random(5)
        alphabet = "aZ09-_:; \t\r\n\x0b\xe9!~\"(,"
        for _ in range(2000):
            headers = [("".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 6))),
                        "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10))))
                       for _ in range(rnd.randint(1, 4))]
            with self.subTest(headers=headers):
                stdlib = http.client.HTTPConnection("127.0.0.1", self.sink.port)
                stdlib.putrequest("GET", "/")
                ours = upstream.Connection("127.0.0.1", self.sink.port)
                ours.putrequest("GET", "/")
                try:
                    for name, value in headers:
                        stdlib.putheader(name, value)
                except Exception as exc:
                    with self.assertRaises(type(exc)):
                        ours.put_headers(headers)
                    continue
                ours.put_headers(headers)
                self.assertEqual(b"\r\n".join(ours._buffer), b"\r\n".join(stdlib._buffer))


if __name__ == "__main__":
    unittest.main()
