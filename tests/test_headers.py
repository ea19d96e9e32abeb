"""The fast header parser gives exactly the standard library's result, for any header block."""

from __future__ import annotations

import email.parser
import http.client
import io
import random
import unittest

from proxy_llm import headers


def stdlib(raw: bytes, _class=http.client.HTTPMessage):
    lines = http.client._read_headers(io.BytesIO(raw))
    return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))


def state(msg):
    return type(msg), list(msg._headers), msg.get_payload(), [type(d) for d in msg.defects], msg.items()


CASES = [
    b"Host: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n",
    b"A: 1\r\nA: 2\r\nB:\r\nC:   spaced  \r\nD:\ttab\r\n\r\n",
    b"X-Latin: caf\xe9\r\nX-Utf8: \xe6\x97\xa5\xe6\x9c\xac\r\n\r\n",
    b"Folded: one\r\n two\r\n\r\n",                       # obs-fold
    b"No colon here\r\nA: 1\r\n\r\n",
    b"Space Before : x\r\n\r\n",
    b"From someone\r\nA: 1\r\n\r\n",
    b"X-Nel: a\x85b\r\n\r\n",                             # NEL splits lines for str.splitlines
    b"X-Vt: a\x0bb\r\nX-Ff: \x0c\r\n\r\n",
    b"X-Cr: a\rb\r\n\r\n",
    b"X-Lf-Only: a\nB: 2\n\n",
    b"A: 1\r\nB: 2\r\n",                                  # no blank line: the stream ended
    b"\r\n",
    b"",
    b"Set-Cookie: a=1; Path=/\r\nSet-Cookie: b=2\r\n\r\n",
    b":empty-name\r\n\r\n",
    b"A: 1\r\n\r\nbody after",
]


class ParseHeadersTest(unittest.TestCase):
    def test_known_cases_match_the_standard_library(self):
        for raw in CASES:
            with self.subTest(raw=raw):
                self.assertEqual(state(headers.parse_headers(io.BytesIO(raw))), state(stdlib(raw)))

    def test_random_blocks_match_the_standard_library(self):
        rnd = random.Random(11)
        alphabet = b"aZ09-_:; \t\r\n\x0b\x0c\x1c\x85\xe9\x00!~\"(,"
        for _ in range(3000):
            lines = []
            for _ in range(rnd.randint(0, 6)):
                if rnd.random() < 0.7:
                    name = bytes(rnd.choice(b"abcXYZ-_09") for _ in range(rnd.randint(1, 8)))
                    value = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
                    lines.append(name + b":" + value + rnd.choice([b"\r\n", b"\n"]))
                else:
                    lines.append(bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12))) + b"\r\n")
            raw = b"".join(lines) + rnd.choice([b"\r\n", b"\n", b""])
            with self.subTest(raw=raw):
                try:
                    expected = state(stdlib(raw))
                except http.client.HTTPException as exc:
                    with self.assertRaises(type(exc)):
                        headers.parse_headers(io.BytesIO(raw))
                    continue
                self.assertEqual(state(headers.parse_headers(io.BytesIO(raw))), expected)

    def test_limits_are_the_standard_librarys(self):
        with self.assertRaises(http.client.LineTooLong):
            headers.parse_headers(io.BytesIO(b"A: " + b"x" * 70000 + b"\r\n\r\n"))
        with self.assertRaises(http.client.HTTPException):
            headers.parse_headers(io.BytesIO(b"A: 1\r\n" * 101 + b"\r\n"))

    def test_install_and_uninstall(self):
        original = http.client.parse_headers
        self.addCleanup(setattr, http.client, "parse_headers", original)
        self.assertTrue(headers.install())
        self.assertIs(http.client.parse_headers, headers.parse_headers)
        headers.uninstall()
        self.assertIs(http.client.parse_headers, headers._ORIGINAL)


if __name__ == "__main__":
    unittest.main()
