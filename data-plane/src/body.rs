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
    fn chunk(&mut self, data: &Bytes);
    /// `complete` is false when the stream failed or the client left early.
    fn finish(self: Box<Self>, complete: bool);
}

/// Passes an upstream body through, showing each chunk to an observer and
/// telling it exactly once when the stream ends.
pub struct ObservedBody<B> {
    inner: B,
    observer: Option<Box<dyn ChunkObserver>>,
}

impl<B> ObservedBody<B> {
    pub fn new(inner: B, observer: Box<dyn ChunkObserver>) -> Self {
        ObservedBody {
            inner,
            observer: Some(observer),
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(obs)) = (frame.data_ref(), this.observer.as_mut()) {
                    obs.chunk(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(obs) = this.observer.take() {
                    obs.finish(false);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if let Some(obs) = this.observer.take() {
                    obs.finish(true);
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        if let Some(obs) = self.observer.take() {
            obs.finish(false);
        }
    }
}
