//! Incremental Server-Sent Events reader.
//!
//! Owns turning a streamed response body, fed in chunks split at arbitrary
//! bytes, into the `data` payloads of complete events, following the
//! WHATWG event-stream parsing rules (LF, CRLF or lone CR line ends; a blank
//! line ends an event; `:` comment lines; one optional space after the colon;
//! multi-line data joined with '\n'; a leading BOM ignored).
//!
//! It only observes: it never changes the bytes passed to the client (the
//! proxy forwards the original chunks). It must never buffer without bound:
//! an event larger than the limit is dropped and `overflowed` set, so a
//! hostile or broken upstream cannot exhaust the proxy's memory.
//!
//! `SseFramer` cuts the same stream into the raw bytes of whole events, for
//! a settler that must decide per event what the client is sent; it holds
//! at most one bounded event, and passes a larger one through unheld.

use bytes::Bytes;

/// Default bound on one event (its data plus the line being read).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug)]
pub struct SseReader {
    /// Bytes of the line not yet terminated.
    line: Vec<u8>,
    /// Data buffer of the event being read; each data line adds value + '\n'.
    data: Vec<u8>,
    /// Whether the event has had a `data` field (an empty one still counts).
    has_data: bool,
    /// The previous chunk ended with CR: an LF starting the next chunk is the
    /// second half of a CRLF, not an empty line.
    skip_lf: bool,
    /// The current event exceeded the limit; its bytes are skipped until the
    /// blank line that ends it.
    discarding: bool,
    /// While discarding, whether the current line has any bytes (so a blank
    /// line can still be recognised without storing the line).
    discard_line_nonempty: bool,
    /// Whether the first line of the stream has been seen (BOM handling).
    started: bool,
    overflowed: bool,
    max_event_bytes: usize,
}

impl Default for SseReader {
    fn default() -> Self {
        Self::new()
    }
}

impl SseReader {
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_MAX_EVENT_BYTES)
    }

    pub fn with_limit(max_event_bytes: usize) -> Self {
        SseReader {
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            skip_lf: false,
            discarding: false,
            discard_line_nonempty: false,
            started: false,
            overflowed: false,
            max_event_bytes,
        }
    }

    /// Whether any event was dropped for exceeding the limit.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes currently held for an incomplete event.
    pub fn buffered(&self) -> usize {
        self.line.len() + self.data.len()
    }

    /// Feeds the next chunk and returns the data of every event it completed,
    /// in order. Invalid UTF-8 is replaced (U+FFFD) rather than failing the
    /// stream: the payloads are only inspected, never forwarded.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = chunk;
        if self.skip_lf && !rest.is_empty() {
            self.skip_lf = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.push_line_bytes(rest);
                    break;
                }
                Some(i) => {
                    self.push_line_bytes(&rest[..i]);
                    let cr = rest[i] == b'\r';
                    rest = &rest[i + 1..];
                    if cr {
                        match rest.first() {
                            Some(b'\n') => rest = &rest[1..],
                            Some(_) => {}
                            None => self.skip_lf = true,
                        }
                    }
                    self.end_line(&mut out);
                }
            }
        }
        out
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.discarding {
            self.discard_line_nonempty = true;
            return;
        }
        if self.buffered() + bytes.len() > self.max_event_bytes {
            self.overflow();
            self.discard_line_nonempty = true;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn overflow(&mut self) {
        self.overflowed = true;
        self.discarding = true;
        self.line = Vec::new();
        self.data = Vec::new();
        self.has_data = false;
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        if self.discarding {
            let blank = !self.discard_line_nonempty;
            self.discard_line_nonempty = false;
            if blank {
                // The oversized event ends here; resume with the next one.
                self.discarding = false;
            }
            self.started = true;
            return;
        }
        let mut line = std::mem::take(&mut self.line);
        if !self.started {
            self.started = true;
            if line.starts_with(BOM) {
                line.drain(..BOM.len());
            }
        }
        if line.is_empty() {
            self.dispatch(out);
        } else if line[0] != b':' {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (&line[..], &[][..]),
            };
            // Only `data` matters to pricing; event, id and retry are ignored.
            if field == b"data" {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
        }
        // Reuse the allocation for the next line.
        line.clear();
        self.line = line;
    }

    fn dispatch(&mut self, out: &mut Vec<String>) {
        if !self.has_data {
            return;
        }
        self.data.pop(); // the '\n' after the last data line
        out.push(String::from_utf8_lossy(&self.data).into_owned());
        self.data.clear();
        self.has_data = false;
    }
}

/// A piece of a stream cut by `SseFramer`, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    /// The raw bytes of one whole event (or run of comment or blank lines),
    /// through the blank line that ends it.
    Event(Bytes),
    /// Bytes of an event too large to hold (or cut short by the end of the
    /// stream): to be passed on as they are, never held.
    Passed(Bytes),
}

/// Cuts a stream, fed in chunks split at arbitrary bytes, into the raw bytes
/// of whole events, following the same line rules as `SseReader` (a blank
/// line ends an event; LF, CRLF or lone CR end a line). Every byte fed comes
/// out exactly once, in order.
///
/// It holds at most `max_event_bytes` of an event it has not seen the end
/// of; past that, the event's bytes come out as `Framed::Passed` as they
/// arrive.
#[derive(Debug)]
pub struct SseFramer {
    /// Bytes of the event not yet complete (or complete, see `awaiting_lf`).
    held: Vec<u8>,
    /// The current line has bytes, so a line end is not a blank line.
    line_nonempty: bool,
    /// The last byte fed was a CR ending a line: an LF next is the second
    /// half of a CRLF, not a blank line.
    after_cr: bool,
    /// `held` is a whole event that ended with a CR at the end of a chunk;
    /// it is released with the next byte (an LF is kept with it).
    awaiting_lf: bool,
    /// The current event outgrew the limit: its bytes are passed through.
    oversized: bool,
    max_event_bytes: usize,
}

impl SseFramer {
    pub fn with_limit(max_event_bytes: usize) -> Self {
        SseFramer {
            held: Vec::new(),
            line_nonempty: false,
            after_cr: false,
            awaiting_lf: false,
            oversized: false,
            max_event_bytes,
        }
    }

    /// Bytes currently held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Feeds the next chunk; returns the pieces it completed, in order.
    pub fn push(&mut self, chunk: &Bytes) -> Vec<Framed> {
        let mut out = Vec::new();
        let len = chunk.len();
        if len == 0 {
            return out;
        }
        // Start of the bytes of `chunk` not yet held or returned.
        let mut start = 0;
        let mut i = 0;
        if self.awaiting_lf {
            self.awaiting_lf = false;
            self.after_cr = false;
            if chunk[0] == b'\n' {
                i = 1;
            }
            self.held.extend_from_slice(&chunk[..i]);
            start = i;
            out.push(Framed::Event(Bytes::from(std::mem::take(&mut self.held))));
        } else if self.after_cr {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                i = 1;
            }
        }
        while i < len {
            let b = chunk[i];
            if b != b'\n' && b != b'\r' {
                self.line_nonempty = true;
                i += 1;
                continue;
            }
            let blank = !self.line_nonempty;
            self.line_nonempty = false;
            let mut end = i + 1;
            let mut cr_at_end = false;
            if b == b'\r' {
                if end < len {
                    if chunk[end] == b'\n' {
                        end += 1;
                    }
                } else {
                    cr_at_end = true;
                }
            }
            i = end;
            if !blank {
                self.after_cr = cr_at_end;
                continue;
            }
            if self.oversized {
                self.oversized = false;
                self.after_cr = cr_at_end;
                out.push(Framed::Passed(chunk.slice(start..end)));
            } else if cr_at_end {
                self.held.extend_from_slice(&chunk[start..end]);
                self.awaiting_lf = true;
            } else {
                out.push(Framed::Event(self.take_with(chunk, start, end)));
            }
            start = end;
        }
        if start < len {
            if self.oversized {
                out.push(Framed::Passed(chunk.slice(start..)));
            } else if self.held.len() + (len - start) > self.max_event_bytes {
                self.oversized = true;
                out.push(Framed::Passed(self.take_with(chunk, start, len)));
            } else {
                self.held.extend_from_slice(&chunk[start..]);
            }
        }
        out
    }

    /// The stream ended: whatever is still held. A whole event that ended in
    /// a CR is an event; the bytes of one never completed are passed on as
    /// they are (a client discards an unfinished event itself).
    pub fn finish(&mut self) -> Vec<Framed> {
        let held = Bytes::from(std::mem::take(&mut self.held));
        let complete = std::mem::take(&mut self.awaiting_lf);
        self.oversized = false;
        self.line_nonempty = false;
        self.after_cr = false;
        if held.is_empty() {
            Vec::new()
        } else if complete {
            vec![Framed::Event(held)]
        } else {
            vec![Framed::Passed(held)]
        }
    }

    /// The held bytes followed by `chunk[start..end]`, without a copy when
    /// nothing is held.
    fn take_with(&mut self, chunk: &Bytes, start: usize, end: usize) -> Bytes {
        if self.held.is_empty() {
            chunk.slice(start..end)
        } else {
            let mut b = std::mem::take(&mut self.held);
            b.extend_from_slice(&chunk[start..end]);
            Bytes::from(b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8]) -> Vec<String> {
        SseReader::new().feed(input)
    }

    #[test]
    fn single_and_multiple_events() {
        assert_eq!(all(b"data: hello\n\n"), ["hello"]);
        assert_eq!(all(b"data: a\n\ndata: b\n\n"), ["a", "b"]);
        // No blank line yet: the event is not complete.
        assert!(all(b"data: a\n").is_empty());
    }

    #[test]
    fn line_endings() {
        assert_eq!(all(b"data: a\r\n\r\ndata: b\r\n\r\n"), ["a", "b"]);
        assert_eq!(all(b"data: a\r\rdata: b\r\r"), ["a", "b"]);
        assert_eq!(all(b"data: a\r\n\ndata: b\n\r\n"), ["a", "b"]);
    }

    #[test]
    fn multi_line_data_joined_with_newline() {
        assert_eq!(all(b"data: a\ndata: b\ndata:c\n\n"), ["a\nb\nc"]);
        assert_eq!(all(b"data\n\n"), [""]);
        assert_eq!(all(b"data:\ndata:\n\n"), ["\n"]);
    }

    #[test]
    fn only_one_leading_space_is_stripped() {
        assert_eq!(all(b"data:  two\n\n"), [" two"]);
        assert_eq!(all(b"data:x: y\n\n"), ["x: y"]);
    }

    #[test]
    fn comments_and_other_fields_ignored() {
        assert_eq!(
            all(b": keep-alive\n\nevent: x\nid: 1\nretry: 5\ndata: d\n: c\n\n"),
            ["d"]
        );
        // An event with no data field dispatches nothing.
        assert!(all(b"event: ping\n\n").is_empty());
        // "datax" and "Data" are other fields.
        assert!(all(b"datax: 1\nData: 2\n\n").is_empty());
    }

    #[test]
    fn leading_bom_ignored_once() {
        assert_eq!(all(b"\xEF\xBB\xBFdata: a\n\n"), ["a"]);
        // A BOM later in the stream is part of the line, so not a data field.
        assert!(all(b"\n\xEF\xBB\xBFdata: a\n\n").is_empty());
    }

    /// The same stream split at every byte position, and fed one byte at a
    /// time, yields the same events as feeding it whole.
    #[test]
    fn any_split_gives_same_events() {
        let stream: &[u8] = b"\xEF\xBB\xBF: hi\r\ndata: {\"a\":1}\r\n\r\ndata: x\rdata: y\r\r\
            event: e\ndata:  z\n\ndata: [DONE]\r\n\r\n";
        let expected = all(stream);
        assert_eq!(expected, ["{\"a\":1}", "x\ny", " z", "[DONE]"]);
        for cut in 0..=stream.len() {
            let mut r = SseReader::new();
            let mut got = r.feed(&stream[..cut]);
            got.extend(r.feed(&stream[cut..]));
            assert_eq!(got, expected, "cut at {cut}");
        }
        for cut1 in 0..stream.len() {
            for cut2 in cut1..stream.len() {
                let mut r = SseReader::new();
                let mut got = r.feed(&stream[..cut1]);
                got.extend(r.feed(&stream[cut1..cut2]));
                got.extend(r.feed(&stream[cut2..]));
                assert_eq!(got, expected, "cuts at {cut1},{cut2}");
            }
        }
        let mut r = SseReader::new();
        let got: Vec<String> = stream.iter().flat_map(|b| r.feed(&[*b])).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let mut r = SseReader::new();
        assert!(r.feed(b"data: a\r").is_empty());
        // If this LF were taken as a blank line the event would end here.
        assert!(r.feed(b"\n").is_empty());
        assert!(r.feed(b"data: b\r").is_empty());
        assert_eq!(r.feed(b"\n\r\n"), ["a\nb"]);
    }

    #[test]
    fn empty_chunks_change_nothing() {
        let mut r = SseReader::new();
        assert!(r.feed(b"data: a\r").is_empty());
        assert!(r.feed(b"").is_empty());
        assert!(r.feed(b"\n").is_empty());
        assert_eq!(r.feed(b"\n"), ["a"]);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        assert_eq!(all(b"data: a\xFFb\n\n"), ["a\u{FFFD}b"]);
    }

    #[test]
    fn oversized_event_is_dropped_and_flagged() {
        let mut r = SseReader::with_limit(64);
        let big = vec![b'x'; 200];
        assert!(r.feed(b"data: ").is_empty());
        assert!(r.feed(&big).is_empty());
        assert!(r.overflowed());
        assert!(r.buffered() <= 64, "{}", r.buffered());
        // Still inside the oversized event: more data lines are skipped.
        assert!(r.feed(b"\ndata: more\n").is_empty());
        assert_eq!(r.buffered(), 0);
        // The blank line ends it; the next event is read normally.
        assert_eq!(r.feed(b"\ndata: next\n\n"), ["next"]);
        assert!(r.overflowed(), "the flag stays set");
    }

    #[test]
    fn many_small_lines_also_count_toward_the_limit() {
        let mut r = SseReader::with_limit(100);
        for _ in 0..50 {
            assert!(r.feed(b"data: abc\n").is_empty());
            assert!(r.buffered() <= 100);
        }
        assert!(r.overflowed());
        assert_eq!(r.feed(b"\ndata: ok\n\n"), ["ok"]);
    }

    #[test]
    fn endless_line_without_newline_stays_bounded() {
        let mut r = SseReader::with_limit(1024);
        let chunk = vec![b'a'; 4096];
        for _ in 0..1000 {
            assert!(r.feed(&chunk).is_empty());
        }
        assert!(r.overflowed());
        assert_eq!(r.buffered(), 0);
        assert!(r.line.capacity() <= 1024 && r.data.capacity() <= 1024);
    }

    #[test]
    fn event_exactly_at_limit_is_kept() {
        // "data: " + 10 bytes is a 16-byte line; the data buffer then holds
        // 10 bytes + '\n'. The largest moment is the full line (16 bytes).
        let mut r = SseReader::with_limit(16);
        assert_eq!(r.feed(b"data: 0123456789\n\n"), ["0123456789"]);
        assert!(!r.overflowed());
        let mut r = SseReader::with_limit(15);
        assert!(r.feed(b"data: 0123456789\n\n").is_empty());
        assert!(r.overflowed());
    }

    fn frame_all(framer: &mut SseFramer, chunks: &[&[u8]]) -> Vec<Framed> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(framer.push(&Bytes::copy_from_slice(c)));
        }
        out.extend(framer.finish());
        out
    }

    fn joined(pieces: &[Framed]) -> Vec<u8> {
        pieces
            .iter()
            .flat_map(|p| match p {
                Framed::Event(b) | Framed::Passed(b) => b.to_vec(),
            })
            .collect()
    }

    #[test]
    fn framer_cuts_whole_events_at_any_split() {
        let stream: &[u8] = b": hi\r\ndata: {\"a\":1}\r\n\r\ndata: x\rdata: y\r\r\
            event: e\ndata:  z\n\ndata: [DONE]\r\n\r\n";
        let expected: Vec<Framed> = [
            &b": hi\r\ndata: {\"a\":1}\r\n\r\n"[..],
            b"data: x\rdata: y\r\r",
            b"event: e\ndata:  z\n\n",
            b"data: [DONE]\r\n\r\n",
        ]
        .iter()
        .map(|e| Framed::Event(Bytes::copy_from_slice(e)))
        .collect();
        assert_eq!(
            frame_all(&mut SseFramer::with_limit(1024), &[stream]),
            expected
        );
        for cut1 in 0..stream.len() {
            for cut2 in cut1..stream.len() {
                let parts = [&stream[..cut1], &stream[cut1..cut2], &stream[cut2..]];
                let got = frame_all(&mut SseFramer::with_limit(1024), &parts);
                assert_eq!(got, expected, "cuts at {cut1},{cut2}");
            }
        }
        // Each event's bytes, fed in order, give the reader's events one by one.
        let mut reader = SseReader::new();
        let data: Vec<Vec<String>> = expected
            .iter()
            .map(|p| match p {
                Framed::Event(b) => reader.feed(b),
                Framed::Passed(_) => unreachable!(),
            })
            .collect();
        assert_eq!(
            data,
            [vec!["{\"a\":1}"], vec!["x\ny"], vec![" z"], vec!["[DONE]"]]
        );
    }

    #[test]
    fn framer_holds_only_the_unfinished_event() {
        let mut f = SseFramer::with_limit(1024);
        assert_eq!(
            f.push(&Bytes::from_static(b"data: a\n\ndata: b")),
            [Framed::Event(Bytes::from_static(b"data: a\n\n"))]
        );
        assert_eq!(f.held(), 7);
        assert!(f.push(&Bytes::from_static(b"\n")).is_empty());
        assert_eq!(
            f.push(&Bytes::from_static(b"\n")),
            [Framed::Event(Bytes::from_static(b"data: b\n\n"))]
        );
        assert_eq!(f.held(), 0);
        // A CR at the end of a chunk may be half of a CRLF: the event waits
        // for the next byte, and keeps the LF.
        assert!(f.push(&Bytes::from_static(b"data: c\r\n\r")).is_empty());
        assert_eq!(
            f.push(&Bytes::from_static(b"\ndata: d\r\r")),
            [Framed::Event(Bytes::from_static(b"data: c\r\n\r\n"))]
        );
        assert_eq!(
            f.finish(),
            [Framed::Event(Bytes::from_static(b"data: d\r\r"))]
        );
        // An unfinished event at the end of the stream is passed on as is.
        assert!(f.push(&Bytes::from_static(b"data: e\n")).is_empty());
        assert_eq!(
            f.finish(),
            [Framed::Passed(Bytes::from_static(b"data: e\n"))]
        );
        assert!(f.finish().is_empty());
    }

    #[test]
    fn framer_passes_an_oversized_event_through_unheld() {
        let mut f = SseFramer::with_limit(16);
        assert!(f.push(&Bytes::from_static(b"data: 0123")).is_empty());
        let big = Bytes::from(vec![b'x'; 100]);
        let mut b = b"data: 0123".to_vec();
        b.extend_from_slice(&big);
        assert_eq!(f.push(&big), [Framed::Passed(Bytes::from(b))]);
        assert_eq!(f.held(), 0);
        for _ in 0..100 {
            assert_eq!(f.push(&big), [Framed::Passed(big.clone())]);
            assert_eq!(f.held(), 0);
        }
        // The blank line ends it; the next event is framed normally.
        assert_eq!(
            f.push(&Bytes::from_static(b"x\n\ndata: next\n\n")),
            [
                Framed::Passed(Bytes::from_static(b"x\n\n")),
                Framed::Event(Bytes::from_static(b"data: next\n\n")),
            ]
        );
        // Whole events within one chunk are framed whatever their size.
        let long = format!("data: {}\n\n", "y".repeat(64));
        assert_eq!(
            f.push(&Bytes::from(long.clone())),
            [Framed::Event(Bytes::from(long))]
        );
    }

    #[test]
    fn framer_returns_every_byte_in_order() {
        let stream: &[u8] =
            b"data: one\n\n: c\r\rdata: a long event over the limit\n\ndata: t\r\n\r\ndata: cut";
        for limit in [4, 16, 1024] {
            for size in 1..stream.len() {
                let chunks: Vec<&[u8]> = stream.chunks(size).collect();
                let got = frame_all(&mut SseFramer::with_limit(limit), &chunks);
                assert_eq!(joined(&got), stream, "limit {limit}, chunks of {size}");
                assert!(got.iter().all(|p| match p {
                    Framed::Event(b) | Framed::Passed(b) => !b.is_empty(),
                }));
            }
        }
    }
}
