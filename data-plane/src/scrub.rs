//! Keeps a vendor's credential out of what reaches the agent.
//!
//! Owns the masking of the credential's exact bytes (the secret and, for
//! Basic, the base64 that carries it: `CredentialInjection::secrets`) in
//! response headers and bodies, buffered or streamed. A match is replaced
//! by as many `*` as it has bytes, so lengths, `Content-Length` and any
//! framing around it stay valid. A stream holds back only a tail that could
//! be the start of a secret cut by a chunk boundary, so SSE events, which
//! end in newlines no credential contains, pass without delay. It never
//! changes a byte that is not part of a match, and never sees a response
//! it cannot read (the proxy asks vendors for `identity` encoding and
//! refuses an encoded answer).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use memchr::memmem::Finder;

/// What replaces each byte of a secret found in a response.
pub const MASK: u8 = b'*';

/// The secrets of one vendor, ready to search for.
pub struct CredentialScrub {
    finders: Vec<Finder<'static>>,
}

impl std::fmt::Debug for CredentialScrub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialScrub").finish_non_exhaustive()
    }
}

impl CredentialScrub {
    /// Searches for each of `secrets` (empty ones are ignored).
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Self {
        CredentialScrub {
            finders: secrets
                .iter()
                .map(AsRef::as_ref)
                .filter(|s| !s.is_empty())
                .map(|s| Finder::new(s).into_owned())
                .collect(),
        }
    }

    /// Masks every secret in `buf`; whether any was found.
    pub fn mask(&self, buf: &mut [u8]) -> bool {
        let mut found = false;
        for f in &self.finders {
            let len = f.needle().len();
            let mut at = 0;
            while let Some(i) = f.find(&buf[at..]) {
                let start = at + i;
                buf[start..start + len].fill(MASK);
                found = true;
                at = start + len;
            }
        }
        found
    }

    fn contains(&self, buf: &[u8]) -> bool {
        self.finders.iter().any(|f| f.find(buf).is_some())
    }

    /// `body` with every secret masked; copied only when one is found.
    pub fn bytes(&self, body: Bytes) -> Bytes {
        if !self.contains(&body) {
            return body;
        }
        let mut owned = BytesMut::from(&body[..]);
        self.mask(&mut owned);
        owned.freeze()
    }

    /// Masks every secret in `headers`' values.
    pub fn headers(&self, headers: &mut HeaderMap) {
        for value in headers.values_mut() {
            if self.contains(value.as_bytes()) {
                let mut owned = value.as_bytes().to_vec();
                self.mask(&mut owned);
                // Masking swaps visible bytes for '*': still a valid value.
                if let Ok(masked) = HeaderValue::from_bytes(&owned) {
                    *value = masked;
                }
            }
        }
    }

    /// Length of the longest tail of `buf` that is the start (not the
    /// whole) of a secret: what a stream must hold until the next chunk.
    fn pending(&self, buf: &[u8]) -> usize {
        let mut hold = 0;
        for f in &self.finders {
            let needle = f.needle();
            let window = (needle.len() - 1).min(buf.len());
            let from = buf.len() - window;
            // Only where the secret's first byte stands can it start; the
            // first such place that fits is the longest tail.
            if let Some(start) = memchr::memchr_iter(needle[0], &buf[from..])
                .map(|i| from + i)
                .find(|&i| needle.starts_with(&buf[i..]))
            {
                hold = hold.max(buf.len() - start);
            }
        }
        hold
    }
}

/// Masks secrets in a body that passes through in chunks, including one
/// cut by a chunk boundary.
pub struct StreamScrub {
    scrub: Arc<CredentialScrub>,
    held: BytesMut,
}

impl StreamScrub {
    pub fn new(scrub: Arc<CredentialScrub>) -> Self {
        StreamScrub {
            scrub,
            held: BytesMut::new(),
        }
    }

    /// What the client gets for `chunk`: it, masked, less a tail that may
    /// continue into a secret in the next chunk.
    pub fn pass(&mut self, chunk: Bytes) -> Bytes {
        if self.held.is_empty() && !self.scrub.contains(&chunk) && self.scrub.pending(&chunk) == 0 {
            return chunk;
        }
        self.held.extend_from_slice(&chunk);
        self.scrub.mask(&mut self.held);
        let hold = self.scrub.pending(&self.held);
        let out = self.held.split_to(self.held.len() - hold);
        out.freeze()
    }

    /// The stream ended: whatever was held back (no secret can follow).
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.held).freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk_live_51Secret";

    fn scrub() -> Arc<CredentialScrub> {
        Arc::new(CredentialScrub::new(&[SECRET, "QUMxOnRva2Vu"]))
    }

    #[test]
    fn every_occurrence_is_masked_byte_for_byte() {
        let s = scrub();
        let body = Bytes::from(format!(
            r#"{{"auth":"Bearer {SECRET}","again":"{SECRET}{SECRET}","basic":"Basic QUMxOnRva2Vu"}}"#
        ));
        let masked = s.bytes(body.clone());
        assert_eq!(masked.len(), body.len());
        let text = std::str::from_utf8(&masked).unwrap();
        assert!(
            !text.contains(SECRET) && !text.contains("QUMxOnRva2Vu"),
            "{text}"
        );
        assert!(text.contains(&format!("Bearer {}", "*".repeat(SECRET.len()))));
        let clean = Bytes::from_static(b"{\"ok\":true}");
        assert_eq!(s.bytes(clean.clone()).as_ptr(), clean.as_ptr(), "no copy");
    }

    #[test]
    fn header_values_are_masked() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-echo-authorization",
            format!("Bearer {SECRET}").parse().unwrap(),
        );
        h.insert("x-other", "fine".parse().unwrap());
        scrub().headers(&mut h);
        assert_eq!(
            h["x-echo-authorization"],
            format!("Bearer {}", "*".repeat(SECRET.len()))
        );
        assert_eq!(h["x-other"], "fine");
    }

    #[test]
    fn a_secret_cut_anywhere_by_chunk_boundaries_is_masked() {
        let body = format!("data: {{\"a\":\"{SECRET}\"}}\n\nxx{SECRET}");
        let bytes = body.as_bytes();
        let expected =
            String::from_utf8(scrub().bytes(Bytes::from(body.clone())).to_vec()).unwrap();
        for size in 1..=bytes.len() {
            let mut stream = StreamScrub::new(scrub());
            let mut out = Vec::new();
            for chunk in bytes.chunks(size) {
                out.extend_from_slice(&stream.pass(Bytes::copy_from_slice(chunk)));
            }
            out.extend_from_slice(&stream.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "chunks of {size}"
            );
        }
        // Two cuts: the secret split over three chunks.
        let mut stream = StreamScrub::new(scrub());
        let mut out = Vec::new();
        for piece in ["x sk_li", "ve_51Se", "cret y"] {
            out.extend_from_slice(&stream.pass(Bytes::from(piece)));
        }
        out.extend_from_slice(&stream.finish());
        assert_eq!(out, format!("x {} y", "*".repeat(SECRET.len())).as_bytes());
    }

    #[test]
    fn a_stream_without_secrets_is_not_held_back() {
        let mut stream = StreamScrub::new(scrub());
        let event = Bytes::from_static(b"data: {\"delta\":\"hi\"}\n\n");
        assert_eq!(stream.pass(event.clone()), event);
        // A tail that could start a secret waits; a full event does not.
        assert_eq!(stream.pass(Bytes::from_static(b"data: sk_")), "data: ");
        assert_eq!(stream.pass(Bytes::from_static(b"x\n\n")), "sk_x\n\n");
        assert!(stream.finish().is_empty());
    }
}
