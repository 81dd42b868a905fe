//! A webhook receiver for tests: an HTTP server on 127.0.0.1 that records
//! every delivery (headers and body) and answers with the statuses it is
//! scripted with, in order (200 once the script runs out). A script entry
//! of `HOLD` never answers: the delivery stays in flight until the sender
//! gives up or dies.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

/// A script entry that never answers.
pub const HOLD: u16 = 0;

/// One delivery as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// What it answered (`HOLD`: nothing).
    pub answered: u16,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON delivery")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<u16>,
    received: Vec<Received>,
}

pub struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver answering `script` in order, then 200.
    pub async fn start(script: &[u16]) -> Receiver {
        let state = Arc::new(Mutex::new(State {
            script: script.iter().copied().collect(),
            received: Vec::new(),
        }));
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let state = shared.clone();
            async move {
                let answer = {
                    let mut s = state.lock().unwrap();
                    let answer = s.script.pop_front().unwrap_or(200);
                    s.received.push(Received {
                        headers,
                        body,
                        answered: answer,
                    });
                    answer
                };
                if answer == HOLD {
                    std::future::pending::<()>().await;
                }
                StatusCode::from_u16(answer).unwrap_or(StatusCode::OK)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            addr,
            state,
            server,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every delivery so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
