"""The SSE decoder (proxy_llm.sse) and the other stream framings of decode_stream."""

from __future__ import annotations

import random
import unittest

from proxy_llm.dialects import decode_stream
from proxy_llm.dialects.streams import JSONArrayDecoder, LineDecoder
from proxy_llm.sse import Event, SSEDecoder, decode_chunks, feed_chunks
from tests.support import split_at


def feed_all(decoder, pieces):
    out = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    out.extend(decoder.close())
    return out




class SSEDecoderTest(unittest.TestCase):
    def decode(self, data, **kw):
        return feed_all(SSEDecoder(**kw), [data])

    def test_fields(self):
        evs = self.decode(b"event: delta\nid: 7\nretry: 1500\ndata: {\"a\":1}\n\n")
        self.assertEqual(len(evs), 1)
        ev = evs[0]
        self.assertEqual((ev.event, ev.id, ev.retry, ev.data), ("delta", "7", 1500, '{"a":1}'))
        self.assertEqual(ev.raw, 'event: delta\nid: 7\nretry: 1500\ndata: {"a":1}\n')
        self.assertEqual(ev.to_json(), {"event": "delta", "data": '{"a":1}', "id": "7", "retry": 1500})
        # With its arrival time (the streams file): first, then the same fields in the same order.
        self.assertEqual(list(ev.to_json(2.5).items()), [("t", 2.5)] + list(ev.to_json().items()))

    def test_line_ends(self):
        for sep in (b"\n", b"\r\n", b"\r"):
            data = b"data: a" + sep + b"data: b" + sep + sep + b"data: c" + sep + sep
            evs = self.decode(data)
            self.assertEqual([e.data for e in evs], ["a\nb", "c"], sep)

    def test_multiline_data_and_no_space(self):
        evs = self.decode(b"data:x\ndata:  y\ndata\n\n")
        self.assertEqual(evs[0].data, "x\n y\n")

    def test_comments_kept(self):
        evs = self.decode(b": OPENROUTER PROCESSING\n\n:ping\ndata: 1\n\n")
        self.assertEqual(len(evs), 2)
        self.assertEqual(evs[0].comments, [" OPENROUTER PROCESSING"])
        self.assertEqual(evs[0].data, "")
        self.assertEqual(evs[1].comments, ["ping"])
        self.assertEqual(evs[1].to_json()["comments"], ["ping"])

    def test_last_event_without_blank_line(self):
        self.assertEqual([e.data for e in self.decode(b"data: 1\n\ndata: 2")], ["1", "2"])
        self.assertEqual([e.data for e in self.decode(b"data: 1\n\ndata: 2\n")], ["1", "2"])

    def test_crlf_split_across_reads(self):
        evs = feed_all(SSEDecoder(), [b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"])
        self.assertEqual([e.data for e in evs], ["a", "b"])
        self.assertEqual(evs[0].raw, "data: a\r\n")

    def test_utf8_split_inside_character(self):
        data = "data: héllo 👋 世界\n\n".encode("utf-8")
        for i in range(1, len(data)):
            evs = feed_all(SSEDecoder(), [data[:i], data[i:]])
            self.assertEqual([e.data for e in evs], ["héllo 👋 世界"], i)

    def test_bom_ignored(self):
        self.assertEqual(self.decode(b"\xef\xbb\xbfdata: 1\n\n")[0].data, "1")

    def test_bom_only_at_the_very_start_of_the_stream(self):
        # WHATWG HTML 9.2.6 decodes the stream with "UTF-8 decode", which takes off one BOM
        # before the first byte and nowhere else: after leading blank lines it is text, and the
        # line it starts a field named "\ufeffdata", ignored. It was dropped from the first line
        # that had a field, blank lines before it or not.
        bom = b"\xef\xbb\xbf"
        cases = [
            (bom + b"data: 1\n\n", ["1"]),
            (bom + b"\ndata: 1\n\n", ["1"]),  # the BOM off, its line is blank: nothing to end
            (b"\n" + bom + b"data: 1\n\n", [""]),
            (b"\r\n\r\n" + bom + b"data: 1\r\n\r\n", [""]),
            (b"\r" + bom + b"data: 1\r\r", [""]),
            (bom + bom + b"data: 1\n\n", [""]),  # one BOM only
            (b"data: 1\n\n" + bom + b"data: 2\n\n", ["1", ""]),
            (bom[:2], [""]),  # the stream ends inside what could have been one: text (U+FFFD)
            (bom[:2] + b"data: 1\n\n", [""]),
        ]
        for data, want in cases:
            for i in range(len(data) + 1):
                for j in range(i, len(data) + 1):
                    got = feed_all(SSEDecoder(), split_at(data, [i, j]))
                    self.assertEqual([e.data for e in got], want, (data, i, j))

    def test_id_and_retry_rules(self):
        ev = self.decode(b"id: a\x00b\nretry: 12x\ndata: 1\n\n")[0]
        self.assertIsNone(ev.id)
        self.assertIsNone(ev.retry)

    def test_max_event_size(self):
        dec = SSEDecoder(max_event_size=64)
        evs = feed_all(dec, [b"data: ok\n\n", b"data: " + b"x" * 200, b"x" * 50 + b"\n",
                             b"data: more\n\n", b"data: after\n\n"])
        self.assertTrue(dec.truncated)
        self.assertEqual([e.data for e in evs], ["ok", "after"])

    def test_max_event_size_many_lines(self):
        dec = SSEDecoder(max_event_size=64)
        evs = feed_all(dec, [b"data: 0123456789\n" * 20 + b"\n" + b"data: after\n\n"])
        self.assertTrue(dec.truncated)
        self.assertEqual([e.data for e in evs], ["after"])

    def test_not_truncated_at_bound(self):
        dec = SSEDecoder(max_event_size=len(b"data: abc\n"))
        self.assertEqual([e.data for e in feed_all(dec, [b"data: abc\n\n"])], ["abc"])
        self.assertFalse(dec.truncated)

    def test_every_split_point(self):
        data = (b"event: a\r\ndata: 1\r\n\r\n: c\ndata: \xe4\xb8\x96\rid: 9\r\r"
                b"data: x\ndata: y\n\ndata: tail")
        want = self.decode(data)
        self.assertEqual(len(want), 4)
        for i in range(1, len(data)):
            for j in range(i, len(data)):
                got = feed_all(SSEDecoder(), split_at(data, [i, j]))
                self.assertEqual(got, want, (i, j))

    def test_whole_event_reads_decode_as_line_by_line(self):
        # Reads of whole LF-terminated events take a shorter path (split on blank lines). The
        # same bytes fed one at a time never can: both must give the same events, truncation
        # flag included, whatever the reads look like.
        # A BOM is dropped at the very start only: after a first event read whole, it is text.
        data = b"data: a\n\n\xef\xbb\xbfdata: b\n\nevent: e\ndata: c\n\n"
        self.assertEqual(feed_all(SSEDecoder(), [data]), feed_all(SSEDecoder(), [data[i:i + 1] for i in range(len(data))]))
        self.assertEqual([e.data for e in feed_all(SSEDecoder(), [data])], ["a", "", "c"])
        rng = random.Random(4321)
        lines = [b"data: {\"a\": 1}", b"data:x", b"data", b"event: delta", b"id: 7", b"id: a\x00b",
                 b"retry: 15", b"retry: 1x", b": keep-alive", b":", b"data: \xe4\xb8\x96 \xff\xe4\xb8",
                 b"\xef\xbb\xbfdata: bom", b"field: ignored", b"data: " + b"y" * 40, b"data: [DONE]"]
        for case in range(400):
            blocks = []
            for _ in range(rng.randrange(1, 6)):
                block = b"\n".join(rng.choice(lines) for _ in range(rng.randrange(1, 4)))
                blocks.append(block + b"\n" * rng.choice((2, 2, 2, 3, 4)))
            data = (b"\n" * rng.choice((0, 0, 1, 2))) + b"".join(blocks)
            if rng.random() < 0.3:
                data += rng.choice(lines)  # a tail still waiting for its line end
            if rng.random() < 0.1:
                data = data.replace(b"\n", b"\r\n", 1)  # not LF only: the line-by-line path
            bound = rng.choice((16, 64, 1 << 20))
            slow = SSEDecoder(max_event_size=bound)
            want = feed_all(slow, [data[i:i + 1] for i in range(len(data))])
            cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 4)))
            fast = SSEDecoder(max_event_size=bound)
            got = feed_all(fast, split_at(data, cuts))
            self.assertEqual(got, want, (case, data, cuts, bound))
            self.assertEqual(fast.truncated, slow.truncated, (case, data))

    def test_decode_chunks_is_feeding_read_by_read(self):
        # decode_chunks splits a whole stream at once when it can: the events, the time of the
        # read each one was completed in, and the truncation flag must be those of feeding the
        # reads one by one, whatever the reads and the blocks look like.
        rng = random.Random(8642)
        lines = [b"data: {\"a\": 1}", b"data:x", b"data: ", b"event: delta", b"event: e", b"id: 7", b"retry: 15",
                 b": keep-alive", b"data: \xe4\xb8\x96 \xff\xe4\xb8", b"\xef\xbb\xbfdata: bom", b"field: x",
                 b"data: " + b"y" * 40, b"data: [DONE]"]
        shapes = (b"data: {\"n\": %d}", b"event: e%d\ndata: {\"n\": 1}")
        for case in range(900):
            blocks = []
            shape = rng.choice(shapes + (None,))  # one of the providers' shapes in every block, or any
            for _ in range(rng.randrange(1, 8)):
                if shape is not None and rng.random() < 0.9:
                    block = shape % case
                else:
                    block = b"\n".join(rng.choice(lines) for _ in range(rng.randrange(1, 4)))
                blocks.append(block + b"\n" * rng.choice((2, 2, 2, 2, 2, 2, 3, 4)))
            data = (b"\n" * rng.choice((0, 0, 0, 1, 2))) + b"".join(blocks)
            if rng.random() < 0.3:
                data += rng.choice(lines) + rng.choice((b"", b"\n"))  # an event still open
            if rng.random() < 0.05:
                data = data.replace(b"\n", b"\r\n", 1)
            if rng.random() < 0.05:
                data = b"\xef\xbb\xbf" + data
            cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(0, 12)))
            chunks = [(0.5 + i, piece) for i, piece in enumerate(split_at(data, cuts))]
            bound = rng.choice((16, 40, 1 << 20))
            want = feed_chunks(SSEDecoder(bound), chunks)
            self.assertEqual(decode_chunks(chunks, bound), want, (case, data, cuts, bound))
        self.assertEqual(decode_chunks([], 64), ([], False))

    def test_random_garbage_never_raises_and_stays_bounded(self):
        rng = random.Random(1234)
        alphabet = b"data: event:id:retry:\r\n\n\r:\xff\xfe\xe4\xb8{}[]\"\\ ,x0"
        for _ in range(300):
            dec = SSEDecoder(max_event_size=rng.choice((8, 64, 1024)))
            data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 600)))
            pieces = split_at(data, [rng.randrange(len(data) + 1) for _ in range(5)])
            for piece in pieces:
                for ev in dec.feed(piece):
                    self.assertIsInstance(ev, Event)
                self.assertLessEqual(sum(len(p) for p in dec._line_parts), dec.max_event_size)
                self.assertLessEqual(sum(len(p) for p in dec._raw), dec.max_event_size)
            dec.close()


class SSEBoundTest(unittest.TestCase):
    def test_the_bound_does_not_depend_on_where_a_crlf_is_split(self):
        # The LF of a CRLF that came in the next read went uncounted: an event near the bound
        # was kept or dropped depending on how the network split it.
        for size in range(6, 14):
            whole = SSEDecoder(size)
            expected = [e.data for e in whole.feed(b"data: x\r\n\r\n") + whole.close()]
            for cut in range(1, 11):
                with self.subTest(size=size, cut=cut):
                    d = SSEDecoder(size)
                    data = b"data: x\r\n\r\n"
                    got = [e.data for e in d.feed(data[:cut]) + d.feed(data[cut:]) + d.close()]
                    self.assertEqual((got, d.truncated), (expected, whole.truncated))


class JSONArrayDecoderTest(unittest.TestCase):
    def test_elements(self):
        data = b'[{"a": "x]}\\"{"},\r\n{"b": [1, {"c": 2}]}\n,\n{"d": null}\n]'
        want = ['{"a": "x]}\\"{"}', '{"b": [1, {"c": 2}]}', '{"d": null}']
        self.assertEqual([e.data for e in feed_all(JSONArrayDecoder(), [data])], want)
        for i in range(1, len(data)):
            for j in range(i, len(data)):
                got = feed_all(JSONArrayDecoder(), split_at(data, [i, j]))
                self.assertEqual([e.data for e in got], want, (i, j))

    def test_scalars_strings_and_non_array(self):
        got = feed_all(JSONArrayDecoder(), [b'[1, "s\\"]", true ,null]'])
        self.assertEqual([e.data for e in got], ["1", '"s\\"]"', "true", "null"])
        got = feed_all(JSONArrayDecoder(), [b'{"error": {"code": 400}}\n'])
        self.assertEqual([e.data for e in got], ['{"error": {"code": 400}}'])

    def test_cut_off_element_is_emitted(self):
        got = feed_all(JSONArrayDecoder(), [b'[{"a": 1}, {"b": '])
        self.assertEqual([e.data for e in got], ['{"a": 1}', '{"b": '])

    def test_bound(self):
        dec = JSONArrayDecoder(max_event_size=16)
        got = feed_all(dec, [b'[{"a": "' + b"x" * 100 + b'"}, {"b": 1}]'])
        self.assertTrue(dec.truncated)
        self.assertEqual([e.data for e in got], ['{"b": 1}'])

    def test_garbage(self):
        rng = random.Random(99)
        alphabet = b'[]{}",\\ :\n1ax\xff'
        for _ in range(300):
            dec = JSONArrayDecoder(max_event_size=rng.choice((4, 32, 512)))
            data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 400)))
            for piece in split_at(data, [rng.randrange(len(data) + 1) for _ in range(4)]):
                dec.feed(piece)
                self.assertLessEqual(sum(len(p) for p in dec._parts), dec.max_event_size)
            dec.close()


class LineDecoderTest(unittest.TestCase):
    def test_lines(self):
        got = feed_all(LineDecoder(), [b'{"a":1}\r', b'\n\n{"b"', b':2}'])
        self.assertEqual([e.data for e in got], ['{"a":1}', '{"b":2}'])


class DecodeStreamTest(unittest.TestCase):
    def test_content_types(self):
        chunks = [(1.5, b"data: 1\n\nda"), (2.5, b"ta: 2\n\n")]
        evs, truncated = decode_stream("text/event-stream; charset=utf-8", chunks, 1024)
        self.assertEqual([(t, e.data) for t, e in evs], [(1.5, "1"), (2.5, "2")])
        self.assertFalse(truncated)
        evs, _ = decode_stream("application/json; charset=UTF-8",
                               [(1.0, b'[{"a":1}'), (2.0, b',{"b":2}]')], 1024)
        self.assertEqual([(t, e.data, e.event) for t, e in evs],
                         [(1.0, '{"a":1}', None), (2.0, '{"b":2}', None)])
        evs, _ = decode_stream("application/x-ndjson", [(1.0, b'{"a":1}\n{"b"'), (3.0, b":2}")], 1024)
        self.assertEqual([(t, e.data) for t, e in evs], [(1.0, '{"a":1}'), (3.0, '{"b":2}')])
        evs, _ = decode_stream(None, [], 1024)
        self.assertEqual(evs, [])

    def test_garbage_every_framing_is_bounded(self):
        rng = random.Random(5150)
        alphabet = b'data: event:\r\n\n:[]{}",\\ \xe4\xb8\x96\xffx1'
        for ctype in ("text/event-stream", "application/json", "application/x-ndjson", None):
            for _ in range(150):
                bound = rng.choice((4, 16, 64, 4096))
                data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 800)))
                pieces = split_at(data, [rng.randrange(len(data) + 1) for _ in range(6)])
                evs, truncated = decode_stream(ctype, [(float(i), p) for i, p in enumerate(pieces)], bound)
                self.assertIsInstance(truncated, bool)
                for t, ev in evs:
                    self.assertLessEqual(len(ev.raw), bound, (ctype, bound, data))
                    self.assertIsInstance(ev.to_json(), dict)

    def test_truncated_flag(self):
        _, truncated = decode_stream("text/event-stream", [(0.0, b"data: " + b"x" * 100 + b"\n\n")], 10)
        self.assertTrue(truncated)


if __name__ == "__main__":
    unittest.main()
