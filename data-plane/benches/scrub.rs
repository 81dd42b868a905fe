//! Masking the vendor credential in responses (`keycap_proxy::scrub`), the
//! step every forwarded response now passes: a 16 KiB JSON body with and
//! without the credential in it, a response's headers, and an SSE stream
//! fed 64-byte event by event, as the proxy does.
//!
//! `cargo bench -p keycap-proxy --bench scrub`; results in BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderName, HeaderValue};
use keycap_proxy::scrub::{CredentialScrub, StreamScrub};

const SECRET: &str = "sk_live_51KeycapBenchCredentialThatIsAboutAsLongAsARealOne0123456789";
const BODY_BYTES: usize = 16 * 1024;

fn body(with_secret: bool) -> Bytes {
    let mut text = String::from(r#"{"object":"list","data":["#);
    while text.len() < BODY_BYTES - 200 {
        text.push_str(r#"{"id":"cus_Nffrfeufn2","object":"customer","email":"a@example.com"},"#);
    }
    if with_secret {
        text.push_str(&format!(r#"{{"echo":"Bearer {SECRET}"}},"#));
    }
    text.push_str("{}]}");
    Bytes::from(text)
}

fn benches(c: &mut Criterion) {
    let scrub = Arc::new(CredentialScrub::new(&[SECRET]));

    let mut group = c.benchmark_group("scrub_body");
    for (name, with_secret) in [("clean_16k", false), ("one_match_16k", true)] {
        let b = body(with_secret);
        group.throughput(Throughput::Bytes(b.len() as u64));
        group.bench_function(name, |bench| {
            bench.iter(|| black_box(scrub.bytes(black_box(b.clone()))))
        });
    }
    group.finish();

    let mut headers = HeaderMap::new();
    for i in 0..20 {
        headers.insert(
            HeaderName::from_bytes(format!("x-vendor-header-{i}").as_bytes()).unwrap(),
            HeaderValue::from_static("req_1234567890abcdef; some=value; other=thing"),
        );
    }
    c.bench_function("scrub_headers/20_clean", |bench| {
        bench.iter(|| {
            let mut h = headers.clone();
            scrub.headers(&mut h);
            black_box(h)
        })
    });

    let event = Bytes::from(format!("data: {{\"delta\":\"{}\"}}\n\n", "x".repeat(44)));
    let mut group = c.benchmark_group("scrub_stream");
    group.throughput(Throughput::Bytes(event.len() as u64 * 100));
    group.bench_function("100_sse_events_of_64b", |bench| {
        bench.iter(|| {
            let mut s = StreamScrub::new(scrub.clone());
            for _ in 0..100 {
                black_box(s.pass(event.clone()));
            }
            black_box(s.finish())
        })
    });
    group.finish();
}

criterion_group! {
    name = scrub_benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(scrub_benches);
