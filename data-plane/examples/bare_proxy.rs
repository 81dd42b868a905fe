//! The floor of keycap's serving stack, for the proxy benchmark: a hyper
//! HTTP/1 server that forwards every request to one upstream through the
//! same pooled hyper client keycap-proxy uses, swapping `Authorization` and
//! doing nothing else (no policy, no pricing, no budget, no audit). What
//! this reaches is the most any proxy built on this stack can reach on the
//! machine; `bench/run.sh` runs it next to nginx and keycap.
//!
//! Usage: bare_proxy <listen addr> <upstream base URL, e.g. http://127.0.0.1:19001>

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

struct Bare {
    upstream: String,
    client: Client<HttpConnector, Incoming>,
    credential: HeaderValue,
}

impl Bare {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let rest = pq.strip_prefix("/stripe").unwrap_or(pq);
        parts.uri = match format!("{}{rest}", self.upstream).parse() {
            Ok(u) => u,
            Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
        };
        parts.headers.remove(header::HOST);
        parts
            .headers
            .insert(header::AUTHORIZATION, self.credential.clone());
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync())),
            Err(_) => Ok(status(StatusCode::BAD_GATEWAY)),
        }
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = code;
    resp
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: bare_proxy <listen addr> <upstream base URL>");
    };
    // Served the way keycap-proxy serves: one single-threaded runtime per
    // CPU, each with its own upstream pool, all accepting from one listener.
    let listener = std::net::TcpListener::bind(&listen)?;
    listener.set_nonblocking(true)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let serving: Vec<_> = (0..threads)
        .map(|_| {
            let listener = listener.try_clone()?;
            let upstream = upstream.clone();
            Ok(std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(serve(listener, upstream))
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    for t in serving {
        t.join()
            .map_err(|_| anyhow::anyhow!("serving thread panicked"))??;
    }
    Ok(())
}

async fn serve(listener: std::net::TcpListener, upstream: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let bare = Arc::new(Bare {
        upstream: upstream.trim_end_matches('/').to_string(),
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(http),
        credential: HeaderValue::from_static("Bearer sk_test_bench"),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let bare = bare.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| bare.clone().handle(req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
