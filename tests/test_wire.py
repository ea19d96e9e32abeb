"""Pure helpers: hop-by-hop filtering, body framing, redaction, model sniffing, labels."""

from __future__ import annotations

import base64
import gc
import gzip
import io
import json
import random
import socket
import sys
import time
import tracemalloc
import unittest
import zlib

from proxy_llm import reader, wire
from proxy_llm.handler import endpoint_label, narrow_accept_encoding
from proxy_llm.sniff import model_elsewhere, model_is_exact, sniff, sniff_stream
from proxy_llm.record import Binary, new_id, parse_body, rfc3339, session_file_id

KEY = b"k" * 32


def headers(*pairs):
    return list(pairs)


class HopByHopTest(unittest.TestCase):
    def test_end_to_end_keeps_order_and_duplicates(self):
        hs = [("A", "1"), ("Connection", "close, X-Foo"), ("X-Foo", "bar"), ("B", "2"), ("A", "3"), ("TE", "trailers"),
              ("Transfer-Encoding", "chunked"), ("Keep-Alive", "5"), ("Upgrade", "h2c"), ("Proxy-Authorization", "x")]
        self.assertEqual(wire.end_to_end(hs), [("A", "1"), ("B", "2"), ("A", "3")])
        self.assertEqual(wire.end_to_end(hs, {"b"}), [("A", "1"), ("A", "3")])


class BodyTest(unittest.TestCase):
    def test_content_length(self):
        self.assertEqual(wire.read_body(io.BytesIO(b"hello!"), headers(("Content-Length", "5")), 10), b"hello")
        with self.assertRaises(wire.BodyError) as cm:
            wire.read_body(io.BytesIO(b"x" * 20), headers(("Content-Length", "20")), 10)
        self.assertEqual(cm.exception.status, 413)
        with self.assertRaises(wire.BodyError) as cm:
            wire.read_body(io.BytesIO(b"abc"), headers(("Content-Length", "5")), 10)
        self.assertEqual(cm.exception.status, 400)
        # "\xb2" (superscript two) and "\u0665" (Arabic-Indic five) are digits to str.isdigit()
        # that int() refuses; 5,000 digits are past int()'s limit: each was a ValueError that
        # escaped, and the client got a dropped connection instead of a 400.
        for bad in ("-1", "abc", "1e3", "\xb2", "\u0665", "\x1c5", "9" * 5000, "9" * 20):
            with self.assertRaises(wire.BodyError):
                wire.read_body(io.BytesIO(b""), headers(("Content-Length", bad)), 10)
        with self.assertRaises(wire.BodyError):
            wire.read_body(io.BytesIO(b""), headers(("Content-Length", "1"), ("Content-Length", "2")), 10)

    def test_ready_is_called_once_the_framing_is_checked_and_a_body_is_to_be_read(self):
        # (Expect: 100-continue is answered there: a refused body is never asked for.)
        calls = []

        def ready():
            calls.append(rfile.tell())  # nothing read yet

        cases = [(("Content-Length", "5"), b"hello!", [0]), (("Content-Length", "0"), b"", []),
                 (("Transfer-Encoding", "chunked"), b"5\r\nhello\r\n0\r\n\r\n", [0]),
                 (("Content-Length", "50"), b"x" * 50, None), (("Transfer-Encoding", "gzip"), b"", None),
                 (("Content-Length", "x"), b"", None)]
        for field, data, expected in cases:
            with self.subTest(field=field):
                del calls[:]
                rfile = io.BytesIO(data)
                if expected is None:
                    with self.assertRaises(wire.BodyError):
                        wire.read_body(rfile, headers(field), 10, ready)
                    self.assertEqual(calls, [])
                else:
                    self.assertEqual(wire.read_body(rfile, headers(field), 10, ready), b"hello" if data else b"")
                    self.assertEqual(calls, expected)

    def test_a_body_of_tiny_chunks_is_gathered_not_kept_a_read_at_a_time(self):
        # 2-byte chunks were a bytes object each, some 28 times the body in memory (an audit's
        # finding: 8 MB of body took 214 MB). Gathered into bytearrays of up to GATHER_MAX.
        n = 50000
        wire_bytes = b"".join(b"2\r\n%02d\r\n" % (i % 100) for i in range(n)) + b"0\r\n\r\n"
        parts = []
        wire._read_chunked(io.BufferedReader(io.BytesIO(wire_bytes), 64), 1 << 30, parts)
        self.assertEqual(len(parts), 1)
        body = wire.read_body(io.BufferedReader(io.BytesIO(wire_bytes), 64), headers(("Transfer-Encoding", "chunked")),
                              1 << 30)
        self.assertIs(type(body), bytes)
        self.assertEqual(body, b"".join(b"%02d" % (i % 100) for i in range(n)))
        # A body in short reads (tiny TCP segments) the same; one read is the object read.
        slow = io.BufferedReader(io.BytesIO(b"ab" * 60000), 2)
        body = wire.read_body(slow, headers(("Content-Length", "120000")), 1 << 30)
        self.assertEqual((type(body), body), (bytes, b"ab" * 60000))

    def test_chunked_at_every_split(self):
        body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"
        self.assertEqual(wire.read_body(io.BytesIO(body), headers(("Transfer-Encoding", "chunked")), 100), b"Wikipedia")
        with self.assertRaises(wire.BodyError) as cm:
            wire.read_body(io.BytesIO(body), headers(("Transfer-Encoding", "chunked")), 5)
        self.assertEqual(cm.exception.status, 413)
        for cut in range(len(body) - 2):
            with self.subTest(cut=cut), self.assertRaises(wire.BodyError):
                wire.read_body(io.BytesIO(body[:cut]), headers(("Transfer-Encoding", "chunked")), 100)
        with self.assertRaises(wire.BodyError):
            wire.read_body(io.BytesIO(body), headers(("Transfer-Encoding", "gzip, chunked")), 100)
        for odd in ("chunked\x0b", "\x85chunked", "chunked\x1c"):  # str.strip() would take these off
            with self.subTest(coding=odd), self.assertRaises(wire.BodyError):
                wire.read_body(io.BytesIO(body), headers(("Transfer-Encoding", odd)), 100)
        self.assertEqual(wire.read_body(io.BytesIO(body), headers(("Transfer-Encoding", " Chunked\t")), 100),
                         b"Wikipedia")
        with self.assertRaises(wire.BodyError):
            wire.read_body(io.BytesIO(body), headers(("Transfer-Encoding", "chunked"), ("Content-Length", "3")), 100)

    def test_a_body_cut_short_keeps_the_bytes_that_arrived(self):
        class Failing(io.RawIOBase):
            """``data`` in reads of at most ``step`` bytes, then ``error`` (None: the end)."""

            def __init__(self, data, step, error):
                super().__init__()
                self.data, self.step, self.error = data, step, error

            def readable(self):
                return True

            def readinto(self, buf):
                if not self.data:
                    if self.error is not None:
                        raise self.error
                    return 0
                n = min(len(buf), self.step, len(self.data))
                buf[:n], self.data = self.data[:n], self.data[n:]
                return n

        body = b'{"model": "m", "messages": []}'
        pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
        chunked = b"".join(wire.chunk(piece) for piece in pieces) + wire.LAST_CHUNK

        def arrived(framing, cut):
            """The body's bytes among the first ``cut`` bytes sent."""
            if framing == "Content-Length":
                return body[:cut]
            out, at = b"", 0
            for piece in pieces:
                start = at + len(b"%x\r\n" % len(piece))
                out += piece[:max(0, cut - start)]
                at = start + len(piece) + 2
            return out

        for framing, data in ((("Content-Length", str(len(body))), body),
                              (("Transfer-Encoding", "chunked"), chunked)):
            for error, message in ((None, "ended"), (ConnectionResetError(104, "reset"), "connection failed"),
                                   (socket.timeout("timed out"), "timed out")):
                for cut in (0, 1, len(data) // 2, len(data) - 1):
                    for step, size in ((3, 8192), (1000, 8192), (1000, 4)):
                        rfile = io.BufferedReader(Failing(data[:cut], step, error), size)
                        with self.subTest(framing=framing[0], error=message, cut=cut, step=step, size=size):
                            with self.assertRaises(wire.BodyError) as cm:
                                wire.read_body(rfile, headers(framing), 1000)
                            self.assertEqual(cm.exception.status, 408 if message == "timed out" else 400)
                            self.assertIn(message if error is not None or framing[0] == "Content-Length"
                                          else "chunk", cm.exception.message)
                            # (gone: the client left mid-body, recorded client_aborted)
                            self.assertEqual(cm.exception.partial, arrived(framing[0], cut))
                            self.assertEqual(cm.exception.gone, message != "timed out")
        # Bad framing is not the client leaving.
        for bad in (b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXY0\r\n\r\n", b"x" * 2000):
            with self.subTest(bad=bad[:20]), self.assertRaises(wire.BodyError) as cm:
                wire.read_body(io.BytesIO(bad), headers(("Transfer-Encoding", "chunked")), 5000)
            self.assertFalse(cm.exception.gone)
        # A whole body read by many small reads is the body.
        for framing, data in ((("Content-Length", str(len(body))), body),
                              (("Transfer-Encoding", "chunked"), chunked)):
            with self.subTest(framing=framing[0], whole=True):
                rfile = io.BufferedReader(Failing(data, 3, None), 4)
                self.assertEqual(wire.read_body(rfile, headers(framing), 1000), body)

    def test_chunk_framing(self):
        self.assertEqual(wire.chunk(b"hello"), b"5\r\nhello\r\n")
        self.assertEqual(wire.chunk(b"x" * 300)[:5], b"12c\r\n")


class RedactionTest(unittest.TestCase):
    def test_headers_keep_the_scheme_and_a_keyed_fingerprint(self):
        a = wire.redact_header("Authorization", "Bearer sk-aaaaaaaaaaaa", KEY)
        b = wire.redact_header("authorization", "Bearer sk-bbbbbbbbbbbb", KEY)
        self.assertRegex(a, r"^Bearer \[REDACTED:[0-9a-f]{8}\]$")
        self.assertNotEqual(a, b)
        self.assertEqual(a, wire.redact_header("Authorization", "Bearer sk-aaaaaaaaaaaa", KEY))
        self.assertNotEqual(a, wire.redact_header("Authorization", "Bearer sk-aaaaaaaaaaaa", b"other-key" * 4))
        for name in ("x-api-key", "api-key", "x-goog-api-key", "proxy-authorization", "cookie", "set-cookie", "x-proxy-key"):
            self.assertNotIn("secret", wire.redact_header(name, "secret-value", KEY))
        self.assertEqual(wire.redact_header("content-type", "application/json", KEY), "application/json")

    def test_the_fingerprint_is_hmac_sha256(self):
        import hmac

        for key in (KEY, b"", b"k", b"k" * 64, b"k" * 65, bytes(range(256))):
            for secret in ("sk-aaaaaaaaaaaa", "", "caf\u00e9", "lone \udc80 surrogate", "x" * 500):
                with self.subTest(key=len(key), secret=secret[:12]):
                    expected = hmac.digest(key, secret.encode("utf-8", "surrogatepass"), "sha256").hex()[:8]
                    self.assertEqual(wire.fingerprint(secret, key), expected)
                    self.assertEqual(wire.fingerprint(secret, key), expected)  # the states are not used up

    def test_a_long_secret_s_fingerprint_is_not_kept(self):
        # A client sending a new 64 KB key with each request: 1,024 of them kept whole were 64 MB.
        import hmac

        before = wire._cached_fingerprint.cache_info().currsize
        for i in range(20):
            secret = ("%d-" % i) + "y" * (64 * 1024)
            expected = hmac.digest(KEY, secret.encode(), "sha256").hex()[:8]
            self.assertEqual(wire.fingerprint(secret, KEY), expected)
        self.assertEqual(wire._cached_fingerprint.cache_info().currsize, before)
        short = "z" * wire.FINGERPRINT_CACHED_CHARS
        wire.fingerprint(short, KEY)
        wire.fingerprint(short, KEY)
        self.assertGreaterEqual(wire._cached_fingerprint.cache_info().hits, 1)

    def test_query(self):
        q = wire.redact_query("alt=sse&key=AIzaSECRET&api_key=x2&token=t&keyword=ok", KEY)
        self.assertNotIn("AIzaSECRET", q)
        self.assertIn("alt=sse", q)
        self.assertIn("keyword=ok", q)
        self.assertEqual(q.count("[REDACTED:"), 3)

    def test_scrub_finds_echoed_secrets(self):
        secrets = [wire.secret_value("Bearer sk-echoed-secret-1")] + wire.query_secrets("alt=sse&key=AIzaEchoedKey")
        self.assertEqual(secrets, ["sk-echoed-secret-1", "AIzaEchoedKey"])
        body = b'{"error":{"message":"Incorrect API key provided: sk-echoed-secret-1 (AIzaEchoedKey)"}}'
        out = wire.scrub(body, wire.scrub_pairs(secrets, KEY))
        self.assertNotIn(b"sk-echoed-secret-1", out)
        self.assertNotIn(b"AIzaEchoedKey", out)
        json.loads(out)

    def test_a_tab_or_spaces_after_the_scheme(self):
        for value in ("Bearer\tsk-tab-token-12345", "Bearer  sk-tab-token-12345", "bearer \t sk-tab-token-12345"):
            with self.subTest(value=value):
                self.assertEqual(wire.secret_value(value), "sk-tab-token-12345")
                self.assertRegex(wire.redact_header("Authorization", value, KEY), r"^[Bb]earer \[REDACTED:[0-9a-f]{8}\]$")
                self.assertEqual(wire.redact_header("Authorization", value, KEY),
                                 value.split()[0] + " " + wire.redacted("sk-tab-token-12345", KEY))
        self.assertEqual(wire.secret_value("sk-plain-key-1"), "sk-plain-key-1")

    def test_what_an_upstream_may_echo_of_a_credential_header_alone(self):
        basic = base64.b64encode("user:pässword-1".encode()).decode()
        self.assertEqual(wire.header_secrets("authorization", "Basic " + basic),
                         [basic, "user:pässword-1", "pässword-1"])
        self.assertEqual(wire.header_secrets("proxy-authorization", "basic\t" + basic.rstrip("=")),
                         [basic.rstrip("="), "user:pässword-1", "pässword-1"])
        latin = base64.b64encode("u:pässword-1".encode("latin-1")).decode()
        self.assertEqual(wire.header_secrets("authorization", "Basic " + latin)[1:], ["u:pässword-1", "pässword-1"])
        for value in ("Basic !!not-base64!!", "Basic " + base64.b64encode(b"no colon").decode(), "Basic",
                      "Bearer " + basic, basic):
            with self.subTest(value=value):
                self.assertEqual(len(wire.header_secrets("authorization", value)), 1)
        self.assertEqual(wire.header_secrets("cookie", 'a=1; sid="quoted-value"; b=; c=plain=with=equals'),
                         ['a=1; sid="quoted-value"; b=; c=plain=with=equals', "1", "quoted-value", "plain=with=equals"])
        self.assertEqual(wire.header_secrets("x-api-key", "a=1; b=2"), ["a=1; b=2"])  # not a cookie
        # Other schemes (an audit's finding: the token of "Key <token>" alone was not scrubbed).
        for name, value in (("authorization", "Key fal-token-123456"), ("proxy-authorization", "Api-Key\tfal-token-123456"),
                            ("authorization", "Digest  fal-token-123456 ")):
            with self.subTest(value=value):
                self.assertEqual(wire.header_secrets(name, value), [value.strip(), "fal-token-123456"])
        self.assertEqual(wire.header_secrets("x-api-key", "Key fal-token-123456"), ["Key fal-token-123456"])
        self.assertEqual(wire.header_secrets("authorization", "a:b fal-token-123456"), ["a:b fal-token-123456"])
        self.assertEqual(wire.request_secrets([("Cookie", "sid=cookie-value-1"), ("Authorization", "Basic " + basic)], ""),
                         ["sid=cookie-value-1", "cookie-value-1", basic, "user:pässword-1", "pässword-1"])

    def test_log_path_keeps_no_secret_of_the_exchange_nor_a_key_shaped_value(self):
        secrets = wire.request_secrets([("Authorization", "Bearer sk-header-secret-1"), ("Accept", "x"),
                                        ("x-goog-api-key", "path/key+01234")], "alt=sse&key=query-secret-2")
        self.assertEqual(secrets, ["sk-header-secret-1", "path/key+01234", "query-secret-2"])
        cases = {
            "/v1/sk-header-secret-1/chat/completions": "/v1/[REDACTED]/chat/completions",
            "/v1beta/models/x:generateContent/query-secret-2": "/v1beta/models/x:generateContent/[REDACTED]",
            "/v1beta/path%2Fkey%2B01234/models/x:generateContent": "/v1beta/[REDACTED]/models/x:generateContent",
            "/v1beta/path%2fkey+01234/models/x:generateContent": "/v1beta/[REDACTED]/models/x:generateContent",
            "/v1beta/models/x:generateContent%3Fkey%3Dunknown-value": "/v1beta/models/x:generateContent%3Fkey%3D[REDACTED]",
            "/v1/x;api_key=unknown-value/y": "/v1/x;api_key=[REDACTED]/y",
            "/v1beta/models/x:generateContent/AIzaSyA0123456789abcdefghijklmnopqrstuv":
                "/v1beta/models/x:generateContent/[REDACTED]",
            "/v1/sk-proj-0123456789abcdefghij/chat": "/v1/[REDACTED]/chat",
            "/v1/chat/completions": "/v1/chat/completions",
            "/v1/short/completions": "/v1/short/completions",
        }
        for path, logged in cases.items():
            with self.subTest(path=path):
                self.assertEqual(wire.log_path(path, secrets + ["short"]), logged)
        # A secret that holds another: the longer one is taken whole.
        self.assertEqual(wire.log_path("/v1/abcdefgh-and-more/x", ["abcdefgh", "abcdefgh-and-more"]), "/v1/[REDACTED]/x")

    def test_a_key_that_only_the_path_holds_is_found_and_redacted_with_its_fingerprint(self):
        # A record's endpoint kept such a key in clear: no header, query or config carried it.
        goog = "AIzaSyA0123456789abcdefghijklmnopqrstuv"
        oai = "sk-proj-0123456789abcdefghijklmn"
        cases = {  # path: ({form in the path: the secret}, the endpoint with "%s" per redaction)
            "/%s/v1beta/models/gemini-2.0-flash:generateContent" % goog:
                ({goog: goog}, "/%s/v1beta/models/gemini-2.0-flash:generateContent"),
            "/v1/%s/chat/completions" % oai: ({oai: oai}, "/v1/%s/chat/completions"),
            "/v1/chat/completions;key=unknown-value": ({"unknown-value": "unknown-value"}, "/v1/chat/completions;key=%s"),
            # Percent-encoded: the form as the path holds it, and the key decoded (an upstream's echo).
            "/v1/x%2F" + oai + "/chat": ({oai: oai}, "/v1/x%%2F%s/chat"),
            "/v1/%73" + oai[1:] + "/chat": ({"%73" + oai[1:]: oai, oai: oai}, "/v1/%s/chat"),
            "/v1beta/models/x:generateContent%3Fkey%3Dunknown-value": (
                {"unknown-value": "unknown-value"}, "/v1beta/models/x:generateContent%%3Fkey%%3D%s"),
        }
        for path, (found, endpoint) in cases.items():
            with self.subTest(path=path):
                self.assertEqual(wire.path_secrets(path), found)
                secret = next(iter(found.values()))
                self.assertEqual(wire.redact_path(path, found, KEY), endpoint % wire.redacted(secret, KEY))
                self.assertNotIn(secret, wire.log_path(path, []))
        # A short credential parameter's value is redacted in its place, not scrubbed elsewhere.
        self.assertEqual(wire.path_secrets("/v1/chat/completions;key=abc"), {})
        self.assertEqual(wire.redact_path("/v1/chat/completions;key=abc", {}, KEY),
                         "/v1/chat/completions;key=" + wire.redacted("abc", KEY))
        # Not inside a longer word (a model named "task-..." holds "sk-" and 20 more), nor a plain path.
        for path in ("/v1/models/task-classification-model-large-v2", "/v1/chat/completions", "/v1/models/%41bc"):
            with self.subTest(path=path):
                self.assertEqual(wire.path_secrets(path), {})
                self.assertEqual(wire.redact_path(path, {}, KEY), path)
                self.assertEqual(wire.log_path(path, []), path)
        # A secret of the exchange percent-encoded, some characters or all: its form in the path,
        # under the secret's fingerprint; as it is, it is the caller's to scrub.
        known = ["path/key+01234", "sk-header-secret-1"]
        path = "/v1/path%2Fkey%2B01234/a/%73k-header-secret-1/b/sk-header-secret-1"
        found = {"path%2Fkey%2B01234": "path/key+01234", "%73k-header-secret-1": "sk-header-secret-1"}
        self.assertEqual(wire.encoded_secrets(path, known), found)
        self.assertEqual(wire.path_secrets(path, known), found)
        self.assertEqual(wire.encoded_secrets(path.replace("%", "-"), known), {})
        self.assertEqual([(r, red) for r, red, _ in wire.form_pairs(found, KEY)],
                         [(b"path%2Fkey%2B01234", wire.redacted("path/key+01234", KEY).encode()),
                          (b"%73k-header-secret-1", wire.redacted("sk-header-secret-1", KEY).encode())])

    def test_query_values_in_every_form_and_names_percent_encoded(self):
        # The upstream decodes the query: its echo holds the decoded key, which must be scrubbed.
        self.assertEqual(wire.query_secrets("key=%41Iza-pct-key"), ["%41Iza-pct-key", "AIza-pct-key"])
        self.assertEqual(wire.query_secrets("alt=sse&key=AIza+plus+key"), ["AIza+plus+key", "AIza plus key"])
        self.assertEqual(wire.query_secrets("key=AIza%2Bx+y"), ["AIza%2Bx+y", "AIza+x+y", "AIza+x y"])
        # A name a server decodes to key= is one.
        for query in ("%6Bey=AIzaNAMEkey123", "%6bEY=AIzaNAMEkey123", "api%5Fkey=AIzaNAMEkey123", "to+ken=x&key=y"):
            with self.subTest(query=query):
                redacted = wire.redact_query(query, KEY)
                self.assertNotIn("AIzaNAMEkey123", redacted)
        self.assertEqual(wire.query_secrets("%6Bey=AIzaNAMEkey123"), ["AIzaNAMEkey123"])
        self.assertEqual(wire.redact_query("%6Bey=AIzaNAMEkey123&alt=sse", KEY),
                         "%6Bey=" + wire.redacted("AIzaNAMEkey123", KEY) + "&alt=sse")
        self.assertEqual(wire.query_secrets("keyword=x&monkey=y&alt=sse"), [])

    def test_a_parameter_after_a_second_question_mark(self):
        # "alt=sse?key=..." (a client appending "?key=" to a URL that had a query already): split
        # on "&" alone, the key was the value of alt.
        for query in ("alt=sse?key=AIzaQMARKkey123", "?key=AIzaQMARKkey123", "a=1&b=2?key=AIzaQMARKkey123&c=3"):
            with self.subTest(query=query):
                self.assertEqual(wire.query_secrets(query), ["AIzaQMARKkey123"])
                redacted = wire.redact_query(query, KEY)
                self.assertNotIn("AIzaQMARKkey123", redacted)
                self.assertEqual(redacted, query.replace("AIzaQMARKkey123", wire.redacted("AIzaQMARKkey123", KEY)))
        self.assertEqual(wire.redact_query("q=why?&alt=sse", KEY), "q=why?&alt=sse")


def _uesc(text, upper=False):
    return "".join(("\\u%04X" if upper else "\\u%04x") % ord(c) for c in text)


def _strings(value):
    """Every string in a JSON value, and in JSON text held in those strings, at any depth."""
    if isinstance(value, str):
        yield value
        if value.strip()[:1] in ("{", "[", '"'):
            try:
                inner = json.loads(value)
            except ValueError:
                return
            yield from _strings(inner)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


class ScrubJsonTest(unittest.TestCase):
    SECRET = "sk-proj-ESCkey/0123+abcd"

    def scrubbed(self, line, secrets):
        """scrub_json's output, checked: valid JSON, no secret in any string at any depth."""
        out = wire.scrub_json(line.encode("utf-8") if isinstance(line, str) else line, wire.scrub_pairs(secrets, KEY))
        value = json.loads(out)
        for s in _strings(value):
            for secret in secrets:
                self.assertNotIn(secret, s, out)
        return out, value

    def test_escaped_echoes_at_one_and_two_levels(self):
        s = self.SECRET
        red = wire.redacted(s, KEY)
        # What an upstream sends, and what a streams line makes of it (event data as a string).
        bodies = {
            "all \\u": '{"error":{"message":"Incorrect API key provided: %s."}}' % _uesc(s),
            "all \\u, upper hex": '{"error":{"message":"key %s"}}' % _uesc(s, upper=True),
            "partial": '{"error":{"message":"key %s%s%s"}}' % (s[:3], _uesc(s[3:7]), s[7:]),
            "gson \\u003d-style": '{"m":"%s"}' % s.replace("+", "\\u002b").replace("/", "\\u002F"),
            "\\/": '{"error":{"message":"key %s"}}' % s.replace("/", "\\/"),
            "tool arguments": json.dumps({"arguments": '{"k":"%s"}' % _uesc(s)}),
        }
        for name, body in bodies.items():
            json.loads(body)
            for level, line in ((1, '{"response_body":%s}' % body),
                                (2, json.dumps({"events": [{"data": body}]})),
                                (3, json.dumps({"outer": json.dumps({"events": [{"data": body}]})}))):
                with self.subTest(name, level=level):
                    out, value = self.scrubbed(line, [s])
                    self.assertIn(red.encode(), out)
                    self.assertNotIn(b"ESCkey", out)

    def test_escape_free_lines_and_other_escapes_are_left_alone(self):
        pairs = wire.scrub_pairs([self.SECRET], KEY)
        for line in (b'{"a":"plain text","n":1}', b'{"a":"line\\nbreak \\u00e9 \\u003c/p\\u003e \\/ \\"q\\""}',
                     b'{"a":"sk-proj-\\u0045SC but not the key"}'):
            self.assertIs(wire.scrub_json(line, pairs), line)

    def test_secrets_holding_a_quote_or_a_backslash(self):
        for secret in ('sk-QUOTEkey"abc\\def12345', "C:\\keys\\secret-01", 'ends-with-a-quote"', "ends-with-backslash\\",
                       "tab\tin-the-key-01", "caf\u00e9-key-0123"):
            red = wire.redacted(secret, KEY)
            encoded = json.dumps(secret)[1:-1]
            for line in ('{"message":"bad key %s"}' % encoded,
                         '{"message":"bad key %s"}' % json.dumps(secret, ensure_ascii=True)[1:-1],
                         '{"message":"%s"}' % _uesc(secret),
                         json.dumps({"data": '{"message":"bad key %s"}' % encoded}),
                         json.dumps({"data": json.dumps({"m": secret})}),
                         json.dumps({"a": "\\" + secret + "\\"})):
                with self.subTest(secret=secret, line=line):
                    out, _ = self.scrubbed(line, [secret])
                    self.assertIn(red.encode(), out)

    def test_a_secret_that_is_also_a_number(self):
        token = "1234567890"
        red = wire.redacted(token, KEY)
        line = (b'{"request_headers":{"authorization":"Bearer x"},"response_body":{"id":"c1","created":1234567890,'
                b'"echo":"token 1234567890","list":[12345678901,-1.1234567890e5,1234567890],"ok":1}}\n')
        out, value = self.scrubbed(line, [token])
        body = value["response_body"]
        self.assertEqual(body["created"], red)
        self.assertEqual(body["echo"], "token " + red)
        self.assertEqual(body["list"], [red, red, red])
        self.assertEqual(body["ok"], 1)
        self.assertEqual(value["request_headers"], {"authorization": "Bearer x"})
        self.assertTrue(out.endswith(b"}\n"))
        # With an escaped echo and a second secret in the same line.
        line = b'{"created":1234567890,"m":"\\u0031234567890 sk-other-key-01"}'
        out, value = self.scrubbed(line, [token, "sk-other-key-01"])
        self.assertEqual(value, {"created": red, "m": "%s %s" % (red, wire.redacted("sk-other-key-01", KEY))})

    def test_random_escapes_at_random_depths(self):
        # Each character of the secret and of the text around it escaped or not, the text held
        # in strings up to four levels deep, as encoders write them: every line stays valid
        # JSON and holds the secret nowhere, at any level.
        rng = random.Random(20240607)
        alphabet = 'ab/"\\\n\tu0-_\u00e9\U0001F600x'
        secrets = ["sk-proj-ABC/def+ghi0123", 'sk"q\\uote/0123', "tok\n\tab/cd", "p\u00e4ssw\u00f6rd-1234",
                   "\\nab/cd12", "u0041bcdefg", "x\U0001F600y/zzzzz", "ends-in-backslash\\"]

        def escaped(text):
            out = []
            for c in text:
                code = ord(c)
                if c == '"':
                    out.append(rng.choice(['\\"', "\\u0022"]))
                elif c == "\\":
                    out.append(rng.choice(["\\\\", "\\u005c", "\\u005C"]))
                elif c == "/":
                    out.append(rng.choice(["/", "\\/", "\\u002f"]))
                elif code < 0x20:
                    out.append(rng.choice([json.dumps(c)[1:-1], "\\u%04x" % code]))
                elif code > 0xFFFF:
                    out.append(rng.choice([c, json.dumps(c)[1:-1].upper().replace("\\U", "\\u")]))
                else:
                    out.append(rng.choice([c, c, "\\u%04x" % code, "\\u%04X" % code]))
            return '"' + "".join(out) + '"'
        for _ in range(600):
            secret = rng.choice(secrets)
            doc = escaped("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) + secret
                          + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))))
            for _ in range(rng.randint(0, 3)):
                doc = json.dumps('{"m":%s}' % doc, ensure_ascii=rng.random() < 0.5)
                if rng.random() < 0.3:
                    doc = doc.replace("/", "\\/")
            line = '{"a":%s,"n":12}' % doc
            json.loads(line)
            with self.subTest(line=line):
                self.scrubbed(line.encode("utf-8", "surrogatepass"), [secret])


class ScrubMemoryTest(unittest.TestCase):
    def test_the_escaped_forms_of_many_long_secrets_are_not_all_kept(self):
        # Their compiled patterns (about 1 MB for 8 KB of key) were kept by an lru_cache of
        # 1,024 and by re's own cache of 512: a client sending another long key with each
        # request made them hold gigabytes. Counted: the bytes still allocated after the loop.
        wire.scrub_json(b'{"a":"\\u0041"}', wire.scrub_pairs(["warm-up-AAAA"], KEY))
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for n in range(60):
            secret = "sk-%02d-" % n + "ABC" * 100
            escaped = secret.replace("A", "\\u0041")  # (as a JSON line may hold it)
            line = ('{"echo":"%s","also":"%s"}' % (secret, escaped)).encode()
            out = wire.scrub_json(line, wire.scrub_pairs([secret], KEY))
            self.assertEqual(out, ('{"echo":"%s","also":"%s"}' % ((wire.redacted(secret, KEY),) * 2)).encode())
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
        # (A pattern of a whole secret was ~4 KB of source and ~70 KB compiled: 4 MB were kept.)
        self.assertLess(kept, 1 << 20)

    def test_a_long_secret_escaped_in_a_mix_of_forms_is_scrubbed_at_a_cost_bounded_by_the_line(self):
        # A client sending a new long credential with each request (a JWT, a session token:
        # 1-4 KB is common, a header line holds 64 KB) had the writer compile a pattern of the
        # whole secret, a group of alternatives per character, to find it JSON-escaped:
        # 0.3 s and a 15 MB peak for 8 KB, 4 s and 120 MB for 64 KB, on every record of a line
        # with a \/ in it. Counted without a clock: the memory the scrub takes at its peak, a
        # few times the line's (a pattern's compiler took 1.8 KB a character of the secret).
        rng = random.Random(20260607)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_."

        def mixed(secret):  # each character as itself, \u-escaped in either case, or \/
            out = []
            for c in secret:
                r = rng.random()
                out.append(c if r < 0.4 else "\\u%04x" % ord(c) if r < 0.7 else "\\u%04X" % ord(c)
                           if c != "/" or r < 0.85 else "\\/")
            return "".join(out)
        for n in (8192, 65536):
            secret = "".join(rng.choice(alphabet) for _ in range(n))
            red = wire.redacted(secret, KEY).encode()
            bodies = {"mixed": '{"error":{"message":"bad key %s."}}' % mixed(secret),
                      "all \\u": '{"error":{"message":"bad key %s"}}' % _uesc(secret, upper=True),
                      "half as itself": '{"m":"bad key %s%s"}' % (secret[:n // 2], _uesc(secret[n // 2:]))}
            for name, body in bodies.items():
                for level, line in ((1, '{"response_body":%s,"n":1}' % body),
                                    (2, json.dumps({"events": [{"data": body}], "a": "\\/"}))):
                    with self.subTest(n=n, form=name, level=level):
                        line = line.encode()
                        pairs = wire.scrub_pairs([secret], KEY)
                        gc.collect()
                        tracemalloc.start()
                        try:
                            out = wire.scrub_json(line, pairs)
                            peak = tracemalloc.get_traced_memory()[1]
                        finally:
                            tracemalloc.stop()
                        self.assertLess(peak, 16 * len(line) + (1 << 20))
                        self.assertEqual(out.count(red), 1)
                        for s in _strings(json.loads(out)):
                            self.assertNotIn(secret, s)
                        # A body cut through it keeps none of its start either.
                        start = line.find(b"bad key ") + 8
                        cut = line[:start + len(line) // 3]
                        self.assertEqual(wire.cut_secret_start(cut, pairs), line[:start])


class CutSecretStartTest(unittest.TestCase):
    PAD = b'{"error":{"message":"Incorrect key: '

    def test_every_start_of_a_secret_in_every_form_is_cut(self):
        for secret in ("sk-proj-ESC/key-0123456789abcd", 'has"quote\\back-012', "p\u00e4ssw\u00f6rd-\U0001F600-xyz"):
            pairs = wire.scrub_pairs([secret, "other-secret-123"], KEY)
            forms = {"as is": json.dumps(secret, ensure_ascii=False)[1:-1], "ascii": json.dumps(secret)[1:-1],
                     "\\u": "".join(json.dumps(c)[1:-1] if ord(c) > 0xFFFF else _uesc(c) for c in secret),
                     "\\/": json.dumps(secret)[1:-1].replace("/", "\\/"),
                     "a level within": json.dumps(json.dumps(_uesc(secret[:6]) + secret[6:]))[3:-3]}
            for name, form in forms.items():
                form = form.encode("utf-8", "surrogatepass")
                # (The whole form is one scrub_json finds.)
                self.assertNotEqual(wire.scrub_json(self.PAD + form + b'"}}', pairs), self.PAD + form + b'"}}')
                for j in range(1, len(form)):
                    with self.subTest(secret=secret, form=name, cut=j):
                        self.assertEqual(wire.cut_secret_start(self.PAD + form[:j], pairs), self.PAD)

    def test_what_starts_no_secret_is_kept(self):
        pairs = wire.scrub_pairs(["sk-proj-0123456789"], KEY)
        for data in (b'{"a":"hello world', b'{"a":"\\u0041bc', b'text that ends in k', b"sk-other", b"sk-proj-1",
                     b"", b"sk-proj-0123456789"):  # (the whole secret: the scrub's)
            with self.subTest(data=data):
                self.assertIs(wire.cut_secret_start(data, pairs), data)
        self.assertEqual(wire.cut_secret_start(b"a sk-proj-0123456789 sk-p", pairs), b"a sk-proj-0123456789 ")

    def test_a_long_secret_is_looked_for_at_the_end_without_a_step_per_length(self):
        # The tail that is a secret's first bytes was looked for one length after another, each
        # comparison copying the secret's start: for a 64 KB secret and a body cut past 64 KB,
        # 64 Ki steps and 2 GB copied (0.1 s). Counted without a clock: the lines of wire run.
        secret = "".join(random.Random(8).choice("ABCDEFGHabcdefgh0123456789") for _ in range(65536))
        pairs = wire.scrub_pairs([secret], KEY)
        for data, kept in ((b"y" * 100000, 100000), (b"y" * 100000 + secret[:40000].encode(), 100000),
                           (secret[:-1].encode(), 0)):
            lines = [0]

            def trace(frame, event, arg):
                if frame.f_globals is vars(wire):
                    lines[0] += 1
                    return trace
                return None
            before = sys.gettrace()
            sys.settrace(trace)
            try:
                out = wire.cut_secret_start(data, pairs)
            finally:
                sys.settrace(before)
            with self.subTest(size=len(data)):
                self.assertEqual(out, data[:kept])
                self.assertLess(lines[0], 1000)

    def test_starts_of_secrets_one_after_another_take_a_pass_each_and_are_given_up_past_a_bound(self):
        pairs = wire.scrub_pairs(["sk-proj-0123456789", "\u00e9t\u00e9-secret"], KEY)
        self.assertEqual(wire.cut_secret_start(b"text sk-sk-proj-", pairs), b"text ")
        self.assertEqual(wire.cut_secret_start(b"x" * 100 + b"sk-pr" * 10 + b"\\u00e9t\\u00e9-se" * 10, pairs),
                         b"x" * 100)
        # Past the bound, nothing is kept (a pass each would make a body of them cost its
        # length in passes: only someone who knows the secrets can send one).
        self.assertEqual(wire.cut_secret_start(b"x" + b"sk-pr" * (wire._CUT_PASSES + 1), pairs), b"")
        self.assertEqual(wire.cut_secret_start(b"x" + b"sk-pr" * (wire._CUT_PASSES - 1), pairs), b"x")


class TargetTest(unittest.TestCase):
    def test_dot_segments_between_any_separator_a_server_reads(self):
        for path in ("/v1/../x", "/v1/..%2fadmin", "/v1/%2E%2E%2Fadmin", "/v1/..%5cadmin", "/v1/..\\admin",
                     "/v1/..;/admin", "/v1/.;x", "/v1/x/%2e"):
            self.assertIsNotNone(wire.bad_target(path, ""), path)
        for path in ("/v1/a..b/c", "/v1/files/file-1.2.jsonl", "/v1/.well-known", "/v1/models/gemini-1.5:generateContent",
                     "/v1/x%2fy", "/v1/..x"):
            self.assertIsNone(wire.bad_target(path, ""), path)


class SniffTest(unittest.TestCase):
    def test_model_and_stream(self):
        # The model for routing; the stream flag of an object is left to the recorder (None).
        self.assertEqual(sniff(b'{"model": "gpt-4o", "stream": true}'), ("gpt-4o", None))
        self.assertEqual(sniff(b'{"stream":false,"model":"m\\u00e9"}'), ("m\u00e9", None))
        self.assertEqual(sniff(b'{"model": 4, "stream": true}'), (None, None))
        self.assertEqual(sniff(b'{"messages":[]}'), (None, None))
        # Not an object: not looked into, so the stream is unknown (a gzip'd or multipart body
        # may ask for one; the recorder tells it from the answer): it was False (an audit).
        self.assertEqual(sniff(b"not json"), (None, None))
        self.assertEqual(sniff(b""), (None, None))
        # "model" inside a string value is escaped, so it cannot be mistaken for the key.
        self.assertEqual(sniff(b'{"messages":[{"content":"say \\"model\\": \\"x\\""}],"model":"real"}'), ("real", None))
        # A nested "model" key before the top-level one: the bracket count tells them apart.
        body = b'{"tools":[{"parameters":{"model":"nested"}}],"model":"top","stream":true,"x":{"stream":false}}'
        self.assertEqual(sniff(body), ("top", None))
        self.assertTrue(sniff_stream(body))
        self.assertFalse(sniff_stream(b'{"model":"m","x":{"stream":true}}'))

    def test_the_model_of_a_compressed_body_or_a_form(self):
        body = json.dumps({"model": "claude-x", "messages": []}).encode()
        self.assertEqual(model_elsewhere(gzip.compress(body), "application/json", "gzip"), "claude-x")
        self.assertEqual(model_elsewhere(zlib.compress(body), "application/json", " Deflate"), "claude-x")
        self.assertIsNone(model_elsewhere(b"\x1f\x8b broken", "application/json", "gzip"))
        self.assertIsNone(model_elsewhere(body, "application/json", "br"))  # (no decoder: routed by path)
        form = (b'--b\r\nContent-Disposition: form-data; name="model"\r\nContent-Type: text/plain\r\n\r\n'
                b'whisper-1\r\n--b--\r\n')
        self.assertEqual(model_elsewhere(form, "multipart/form-data; boundary=b", ""), "whisper-1")
        self.assertEqual(model_elsewhere(b"x" * 200000 + form, "Multipart/Form-Data; boundary=b", ""), "whisper-1")
        self.assertIsNone(model_elsewhere(form.replace(b'"model"', b'"models"'), "multipart/form-data", ""))
        self.assertIsNone(model_elsewhere(form, "application/x-www-form-urlencoded", ""))

    def test_large_bodies_with_the_key_at_either_end_or_nested(self):
        history = [{"role": "user", "content": "{[ \"model\": \"no\" ]} " * 40} for _ in range(100)]
        for obj in ({"messages": history, "model": "end", "stream": True, "metadata": {"model": "nested"}},
                    {"model": "start", "metadata": {"model": "nested", "stream": False}, "messages": history},
                    {"messages": history, "model": "mid", "tools": history},
                    {"messages": history, "metadata": {"model": "nested-only"}}):
            body = json.dumps(obj).encode()
            with self.subTest(model=obj.get("model")):
                self.assertGreater(len(body), 64 * 1024)
                self.assertEqual(sniff(body), (obj.get("model"), None))  # stream: left to the recorder
                self.assertEqual(sniff_stream(body), obj.get("stream") is True)

    def test_matches_a_full_parse_on_random_bodies(self):
        rnd = random.Random(7)
        for _ in range(300):
            obj = {"messages": [{"role": "user", "content": rnd.choice(["model", '"model": "x"', "stream", "é"])}]}
            if rnd.random() < 0.8:
                obj["model"] = rnd.choice(["gpt-4o", "claude-3", 'we"ird', "é"])
            if rnd.random() < 0.5:
                obj["stream"] = rnd.random() < 0.5
            if rnd.random() < 0.2:
                obj["metadata"] = {"model": "meta"}
            items = list(obj.items())
            rnd.shuffle(items)
            body = json.dumps(dict(items), ensure_ascii=rnd.random() < 0.5).encode()
            with self.subTest(body=body):
                self.assertEqual(sniff(body), (obj.get("model"), None))
                self.assertEqual(sniff_stream(body), obj.get("stream") is True)


    def test_matches_a_full_parse_with_repeated_and_escaped_keys(self):
        # Written as text: a key given twice (a parser keeps the last), keys that end in an
        # escaped quote and "model" (inside a string, not the key), values of every kind.
        rnd = random.Random(11)
        keys = [b'"model"', b'"model"', b'"stream"', b'"x\\"model"', b'"x\\"stream"', b'"messages"', b'"y\\\\"']
        values = [b'"a"', b'"b\\u00e9"', b"null", b"4", b"true", b"false", b'{"model":"n","stream":true}',
                  b'[{"model":"m"}]', b'"\\"model\\":\\"s\\""']
        for pad in (0, 40 * 1024):
            for _ in range(400):
                pairs = [b"%s:%s" % (rnd.choice(keys), rnd.choice(values)) for _ in range(rnd.randint(0, 5))]
                if pad:
                    pairs.insert(rnd.randint(0, len(pairs)), b'"pad":"%s"' % (b"p" * pad))
                body = b"{%s}" % b",".join(pairs)
                parsed = json.loads(body)
                model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
                with self.subTest(body=body[:300]):
                    if not pad:
                        self.assertTrue(model_is_exact(body))
                        self.assertEqual(sniff_stream(body), parsed.get("stream") is True)
                    if model_is_exact(body):
                        self.assertEqual(sniff(body)[0], model)

    def test_a_model_key_given_twice_is_found_from_either_end(self):
        # model_is_exact searches back from the end: the key given twice, even where the two
        # share a quote ('"model"model"', not JSON, but a 2xx body is not parsed first), or
        # once in the middle of a long body, is not exact; once near either end is.
        pad = b"x" * 20000
        self.assertFalse(model_is_exact(b'{"a":"%s","model"model":"m"}' % pad))
        self.assertFalse(model_is_exact(b'{"model"model":"m","a":"%s"}' % pad))
        self.assertFalse(model_is_exact(b'{"model":"m","a":"%s","model":"n"}' % pad))
        self.assertFalse(model_is_exact(b'{"a":"%s","model":"m","b":"%s"}' % (pad, pad)))
        self.assertTrue(model_is_exact(b'{"a":"%s","model":"m"}' % pad))
        self.assertTrue(model_is_exact(b'{"model":"m","a":"%s"}' % pad))
        self.assertTrue(model_is_exact(b'{"a":"%s"}' % pad))


class LabelTest(unittest.TestCase):
    def test_endpoint_labels_are_bounded(self):
        self.assertEqual(endpoint_label("/v1/chat/completions"), "/v1/chat/completions")
        self.assertEqual(endpoint_label("/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
                         "/v1beta/models/*:streamGenerateContent")
        self.assertEqual(endpoint_label("/v1/models/gpt-4o"), "/v1/models/*")
        self.assertEqual(endpoint_label("/v1/anything/%s" % ("x" * 50)), "other")
        self.assertEqual(endpoint_label("/v1beta/models/x:evilMethod"), "other")
        self.assertEqual(endpoint_label("/v1/models/gemini-2.0-flash:generateContent"), "/v1/models/*:generateContent")

    def test_every_openai_endpoint_is_a_label_under_v1_as_under_azure(self):
        # /v1/audio/translations, /v1/images/edits and /v1/images/variations were "other", while
        # Azure OpenAI's paths to the same endpoints had labels of their own.
        from proxy_llm.errors import OPENAI_PATHS

        for path in sorted(OPENAI_PATHS):
            with self.subTest(path=path):
                self.assertEqual(endpoint_label(path), path)
                self.assertEqual(endpoint_label("/openai/deployments/d" + path[3:]), "/openai/deployments/*" + path[3:])
                # (the AzureOpenAI client's path of an endpoint without a deployment, the
                # Responses API's, was "other"; Azure's v1 API's had its label)
                self.assertEqual(endpoint_label("/openai" + path[3:]), "/openai" + path[3:])
                self.assertEqual(endpoint_label("/openai/v1" + path[3:]), "/openai/v1" + path[3:])

    def test_no_label_holds_a_segment_of_the_path(self):
        # A key a client put in its base URL, before /models/, was a label of its own.
        for path in ("/v1beta/sk-path-key-0123456789/models/gemini-2.0-flash:generateContent",
                     "/v1/sk-path-key-0123456789/models/x:streamGenerateContent",
                     "/v1beta/projects/p/locations/l/models/x:countTokens",
                     "/v1beta/models/x:generateContent/sk-path-key-0123456789",
                     "/v1beta/models/x/sk-path-key-0123456789:generateContent",
                     "/v1beta/models/x:generateContent\nsk-path-key-0123456789"):
            with self.subTest(path=path):
                self.assertEqual(endpoint_label(path), "other")

    def test_accept_encoding_is_narrowed(self):
        self.assertEqual(narrow_accept_encoding("gzip, deflate, br, zstd"), "gzip, deflate")
        self.assertEqual(narrow_accept_encoding("br"), "identity")
        self.assertEqual(narrow_accept_encoding("gzip;q=1.0, identity; q=0.5, *;q=0"), "gzip;q=1.0, identity; q=0.5")
        self.assertIsNone(narrow_accept_encoding(None))


class RecordHelpersTest(unittest.TestCase):
    def test_ids_are_unique_and_time_ordered(self):
        ids = [new_id(1700000000.0 + i / 1000.0) for i in range(2000)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 2000)
        self.assertTrue(all(len(i) == 26 for i in ids))
        self.assertEqual(new_id(0)[:10], "0000000000")

    def test_parse_body(self):
        self.assertEqual(parse_body(b""), (None, None))
        self.assertEqual(parse_body(b'{\n "a": 1\r\n}'), ({"a": 1}, b'{  "a": 1  }'))
        self.assertEqual(parse_body(b"<html>"), ("<html>", None))
        self.assertEqual(parse_body(b" \t\n"), (" \t\n", None))  # text, as sent: not empty
        self.assertEqual(parse_body(b"NaN"), ("NaN", None))
        value, raw = parse_body(b"\xff\xfe")  # not UTF-8: its bytes, for the record's base64
        self.assertEqual((type(value), value, raw), (Binary, b"\xff\xfe", None))

    def test_rfc3339_is_the_second_in_utc_and_its_microseconds_truncated(self):
        # rfc3339 remembers the last second's form and bounds (record._second_cache): times in
        # one second, on its edges, jumping forward and back, each as if formatted afresh.
        def fresh(t):
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t))) + ".%06dZ" % int((t - int(t)) * 1e6)

        rnd = random.Random(7)
        base = 1764000000.0
        times = [base, base + 0.999999, base + 1.0, base + 0.5, base - 0.000001, base + 86400.25, base + 0.25,
                 0.0, 0.5, 1.0, 1e9 + 0.123456, base + 1 - 2 ** -22]  # (the last float before the next second)
        times += [base + rnd.uniform(-5, 5) for _ in range(2000)] + [rnd.uniform(0, 4e9) for _ in range(500)]
        for t in times:
            with self.subTest(t=t):
                self.assertEqual(rfc3339(t), fresh(t))
        self.assertEqual(rfc3339(1764000000.25), "2025-11-24T16:00:00.250000Z")

    def test_parse_body_reads_as_the_json_module_decodes(self):
        # parse_body scans the value inside JSON's whitespace itself (record.parse_body): what
        # it takes, and what it leaves as text, is what the strict decoder's decode() does.
        strict = reader.STRICT_JSON
        texts = ['{"a": 1} {"b": 2}', "1 2", "[1]x", '"a""b"', " \r\n[1, 2]\t ", "\t{}\n", "\x0c1",
                 "1\x0c", "\u00a01", "1\u00a0", "\u20281", "[1,]", "{", "]", "tru", "true false",
                 '"\\ud800"', "-0", "1e999", "[[[]]]", "null", " null ", "0 ", "00", "\n\n{\"k\":\"v\"}\n\n"]
        for text in texts:
            with self.subTest(text=text):
                try:
                    expected = strict.decode(text)
                except ValueError:
                    expected = text
                value, raw = parse_body(text.encode("utf-8", "surrogatepass"))
                self.assertEqual(value, expected)
                self.assertEqual(type(value), type(expected))
                self.assertEqual(raw is None, expected is text)

    def test_session_file_ids_are_safe(self):
        rnd = random.Random(3)
        alphabet = "aZ09._-/\\\x00 é日\U0001f600:*?"
        for _ in range(3000):
            sid = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 200)))
            name = session_file_id(sid)
            with self.subTest(sid=sid):
                self.assertRegex(name, r"^[A-Za-z0-9._-]{1,64}$")
                self.assertNotIn(name, (".", ".."))
        self.assertEqual(session_file_id("ok-id"), "ok-id")
        self.assertNotEqual(session_file_id(".."), "..")
        self.assertNotEqual(session_file_id("a/b"), session_file_id("a\\b"))


if __name__ == "__main__":
    unittest.main()


class PoolTest(unittest.TestCase):
    def test_stale_check_works_past_fd_setsize(self):
        import resource
        import socket

        from proxy_llm.upstream import _readable

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1200:
            self.skipTest("cannot open 1200 descriptors here")
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard) if hard != resource.RLIM_INFINITY else 4096, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        filler = []
        self.addCleanup(lambda: [s.close() for s in filler])
        while True:
            a, b = socket.socketpair()
            filler += [a, b]
            if b.fileno() > 1100:
                break
        self.assertFalse(_readable(a))  # idle and open: reusable
        b.close()
        self.assertTrue(_readable(a))   # the peer closed: stale
