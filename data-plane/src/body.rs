//! Request bodies as the proxy reads them, response bodies as it returns
//! them, and the streaming body that settles a call when its (SSE)
//! response has fully passed through — or when the client goes away,
//! whichever comes first. Settlement happens exactly once.
//!
//! A request body is read whole, at most `--max-body-bytes` of it, and at
//! a pace (`BodyPace`): a client that trickles its body is cut off rather
//! than holding its connection open. Reading never forwards anything; what
//! a refused body already sent is dropped.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
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

/// How fast a request body must arrive: whole within `total`, and, once
/// `grace` has passed, at an average of at least `min_bytes_per_sec` since
/// it started (0: no minimum). The average, not each gap, is judged, so a
/// client that sent quickly may pause; one that never sent much may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPace {
    pub total: Duration,
    pub grace: Duration,
    pub min_bytes_per_sec: u64,
}

impl BodyPace {
    /// How long after the body started more of it (or its end) must have
    /// arrived, once `received` bytes have: the moment the average would
    /// drop below the minimum, no earlier than `grace`, no later than
    /// `total`.
    pub fn allowance(&self, received: u64) -> Duration {
        let by_rate = match self.min_bytes_per_sec {
            0 => self.total,
            rate => Duration::from_millis(received.saturating_mul(1000) / rate).max(self.grace),
        };
        by_rate.min(self.total)
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyReadError {
    /// More than the limit.
    TooLarge,
    /// Slower than its `BodyPace`.
    TooSlow,
    /// Cut short or badly framed (the client's malformed request).
    Unreadable(BoxError),
}

/// Reads a whole request body of at most `limit` bytes at `pace`. Trailers
/// are dropped.
pub async fn read_paced<B>(
    mut body: B,
    limit: usize,
    pace: BodyPace,
) -> Result<Bytes, BodyReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let started = tokio::time::Instant::now();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received: usize = 0;
    loop {
        let by = started + pace.allowance(received as u64);
        let frame = match tokio::time::timeout_at(by, body.frame()).await {
            Err(_) => return Err(BodyReadError::TooSlow),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyReadError::Unreadable(e.into())),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            received = received.saturating_add(data.len());
            if received > limit {
                return Err(BodyReadError::TooLarge);
            }
            if !data.is_empty() {
                chunks.push(data);
            }
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.remove(0),
        _ => {
            let mut whole = BytesMut::with_capacity(received);
            for c in chunks {
                whole.extend_from_slice(&c);
            }
            whole.freeze()
        }
    })
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
                        // Trailers are dropped: nothing an agent calls
                        // through keycap needs them, and they could carry
                        // what the observer masks in the data (a vendor
                        // echoing the request's headers).
                        (Err(_trailers), _) => continue,
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

    use futures_util::StreamExt as _;
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

    const PACE: BodyPace = BodyPace {
        total: Duration::from_secs(30),
        grace: Duration::from_secs(5),
        min_bytes_per_sec: 1000,
    };

    #[test]
    fn a_body_must_keep_its_average_after_the_grace_and_end_in_time() {
        // Nothing yet, or too little to matter: the grace.
        assert_eq!(PACE.allowance(0), Duration::from_secs(5));
        assert_eq!(PACE.allowance(4_999), Duration::from_secs(5));
        // Then the moment the average would fall under the minimum.
        assert_eq!(PACE.allowance(12_000), Duration::from_secs(12));
        assert_eq!(PACE.allowance(12_345), Duration::from_millis(12_345));
        // Never past the whole body's deadline, however much arrived.
        assert_eq!(PACE.allowance(10_000_000), Duration::from_secs(30));
        assert_eq!(PACE.allowance(u64::MAX), Duration::from_secs(30));
        let no_minimum = BodyPace {
            min_bytes_per_sec: 0,
            ..PACE
        };
        assert_eq!(no_minimum.allowance(0), Duration::from_secs(30));
    }

    /// A body fed through a channel: each `Some` a chunk, `None` its end.
    fn channel_body() -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        impl Body<Data = Bytes, Error = BoxError> + Unpin,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let frames = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(|b| Ok::<_, BoxError>(Frame::data(b)));
        (tx, StreamBody::new(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_is_cut_and_a_paced_one_is_read_whole() {
        // A byte every 1.5 s: far under 1000 bytes/s once the grace is over.
        let (tx, body) = channel_body();
        let started = tokio::time::Instant::now();
        let trickle = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                if tx.send(Bytes::from_static(b"x")).is_err() {
                    return;
                }
            }
        });
        let cut = read_paced(body, 1 << 20, PACE).await;
        assert!(matches!(cut, Err(BodyReadError::TooSlow)), "{cut:?}");
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "cut at the grace"
        );
        trickle.abort();

        // Fast enough, in three pieces and a pause: read whole.
        let (tx, body) = channel_body();
        let reading = tokio::spawn(read_paced(body, 1 << 20, PACE));
        tx.send(Bytes::from(vec![b'a'; 6000])).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send(Bytes::from_static(b"b")).unwrap();
        tx.send(Bytes::from_static(b"c")).unwrap();
        drop(tx);
        let whole = reading.await.unwrap().unwrap();
        assert_eq!(whole.len(), 6002);
        assert_eq!(&whole[5999..], b"abc");

        // Steady above the minimum, but never ending: cut at the total.
        let (tx, body) = channel_body();
        let started = tokio::time::Instant::now();
        let reading = tokio::spawn(read_paced(body, 1 << 20, PACE));
        let feeding = tokio::spawn(async move {
            while tx.send(Bytes::from(vec![b'x'; 2000])).is_ok() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let cut = reading.await.unwrap();
        assert!(matches!(cut, Err(BodyReadError::TooSlow)), "{cut:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        feeding.abort();
    }

    #[tokio::test]
    async fn a_body_over_the_limit_or_failing_is_refused_as_such() {
        let (tx, body) = channel_body();
        tx.send(Bytes::from(vec![0; 600])).unwrap();
        tx.send(Bytes::from(vec![0; 600])).unwrap();
        let r = read_paced(body, 1000, PACE).await;
        assert!(matches!(r, Err(BodyReadError::TooLarge)), "{r:?}");
        let failing = StreamBody::new(futures_util::stream::iter(vec![Err::<Frame<Bytes>, _>(
            BoxError::from("reset"),
        )]));
        let r = read_paced(failing, 1000, PACE).await;
        assert!(matches!(r, Err(BodyReadError::Unreadable(_))), "{r:?}");
        let (tx, body) = channel_body();
        drop(tx);
        assert!(read_paced(body, 1000, PACE).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_vendors_trailers_never_reach_the_client() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-echo-authorization", "Bearer sk_live_x".parse().unwrap());
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(
                b"a
b",
            ))),
            Ok(Frame::trailers(trailers)),
            Ok(Frame::data(Bytes::from_static(
                b"c
",
            ))),
        ];
        let finished = Arc::new(Mutex::new(Vec::new()));
        let observer = LineObserver {
            held: Vec::new(),
            finished: finished.clone(),
        };
        let inner = StreamBody::new(futures_util::stream::iter(frames));
        let mut body = ObservedBody::new(inner, Box::new(observer));
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            assert!(frame.is_data(), "a non-data frame passed: {frame:?}");
            seen.push(frame.into_data().unwrap());
        }
        // The bytes held back before the trailers still come out in order.
        assert_eq!(
            seen,
            [
                "a
", "bc
"
            ]
        );
        assert_eq!(*finished.lock().unwrap(), [true]);
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
