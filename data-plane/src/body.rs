//! Response bodies the proxy returns, and the streaming body that settles a
//! call when its (SSE) response has fully passed through — or when the
//! client goes away, whichever comes first. Settlement happens exactly once.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: Full<Bytes>) -> ProxyBody {
    b.map_err(|never| match never {}).boxed_unsync()
}

pub fn bytes(b: Bytes) -> ProxyBody {
    full(Full::new(b))
}

/// Called once with every data chunk, then once at the end.
pub trait ChunkObserver: Send + 'static {
    /// Sees a chunk and returns what the client gets for it: the chunk
    /// itself, or less when the observer holds bytes back.
    fn chunk(&mut self, data: Bytes) -> Bytes;
    /// The upstream body ended: bytes still held back, sent last.
    fn end_of_stream(&mut self) -> Bytes;
    /// `complete` is false when the stream failed or the client left early.
    fn finish(self: Box<Self>, complete: bool);
}

/// Passes an upstream body through, showing each chunk to an observer
/// (which may hold bytes back) and telling it exactly once when the stream
/// ends. Its length is never announced in advance, since the observer may
/// change it.
pub struct ObservedBody<B> {
    inner: B,
    observer: Option<Box<dyn ChunkObserver>>,
    ended: bool,
}

impl<B> ObservedBody<B> {
    pub fn new(inner: B, observer: Box<dyn ChunkObserver>) -> Self {
        ObservedBody {
            inner,
            observer: Some(observer),
            ended: false,
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match (frame.into_data(), this.observer.as_mut()) {
                        (Ok(data), Some(obs)) => {
                            let out = obs.chunk(data);
                            if out.is_empty() {
                                // All held back: nothing to send yet.
                                continue;
                            }
                            Frame::data(out)
                        }
                        (Ok(data), None) => Frame::data(data),
                        (Err(other), _) => other,
                    };
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(obs) = this.observer.take() {
                        obs.finish(false);
                    }
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    let Some(mut obs) = this.observer.take() else {
                        return Poll::Ready(None);
                    };
                    let tail = obs.end_of_stream();
                    obs.finish(true);
                    if tail.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(tail))))
                    }
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        if let Some(obs) = self.observer.take() {
            obs.finish(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::StreamBody;

    use super::*;

    /// Holds bytes back until a line is complete; the unfinished line is the
    /// end-of-stream tail. Records every `finish`.
    struct LineObserver {
        held: Vec<u8>,
        finished: Arc<Mutex<Vec<bool>>>,
    }

    impl ChunkObserver for LineObserver {
        fn chunk(&mut self, data: Bytes) -> Bytes {
            self.held.extend_from_slice(&data);
            match self.held.iter().rposition(|&b| b == b'\n') {
                Some(i) => Bytes::from(self.held.drain(..=i).collect::<Vec<u8>>()),
                None => Bytes::new(),
            }
        }
        fn end_of_stream(&mut self) -> Bytes {
            Bytes::from(std::mem::take(&mut self.held))
        }
        fn finish(self: Box<Self>, complete: bool) {
            self.finished.lock().unwrap().push(complete);
        }
    }

    fn observed(
        chunks: Vec<Result<&'static [u8], &'static str>>,
    ) -> (
        impl Body<Data = Bytes, Error = BoxError> + Unpin,
        Arc<Mutex<Vec<bool>>>,
    ) {
        let finished = Arc::new(Mutex::new(Vec::new()));
        let frames = chunks.into_iter().map(|c| {
            c.map(|b| Frame::data(Bytes::from_static(b)))
                .map_err(BoxError::from)
        });
        let inner = StreamBody::new(futures_util::stream::iter(frames));
        let observer = LineObserver {
            held: Vec::new(),
            finished: finished.clone(),
        };
        (ObservedBody::new(inner, Box::new(observer)), finished)
    }

    #[tokio::test]
    async fn held_back_bytes_and_the_tail_reach_the_client_in_order() {
        let (mut body, finished) = observed(vec![Ok(b"ab"), Ok(b"c\nde"), Ok(b"f"), Ok(b"g\nh")]);
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap().into_data().unwrap());
        }
        // Chunks held back entirely send nothing; what was held comes out
        // before the bytes after it, and the tail comes last.
        assert_eq!(frames, ["abc\n", "defg\n", "h"]);
        assert!(body.is_end_stream());
        assert_eq!(*finished.lock().unwrap(), [true]);
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(*finished.lock().unwrap(), [true], "finished exactly once");
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_stream_finishes_incomplete_once() {
        let (mut body, finished) = observed(vec![Ok(b"a\nb"), Err("upstream reset")]);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a\n"
        );
        assert!(body.frame().await.unwrap().is_err());
        drop(body);
        assert_eq!(*finished.lock().unwrap(), [false]);

        let (mut body, finished) = observed(vec![Ok(b"a\n"), Ok(b"b\n")]);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a\n"
        );
        drop(body);
        assert_eq!(*finished.lock().unwrap(), [false]);
    }
}
