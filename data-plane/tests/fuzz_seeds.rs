//! The fuzz harness on stable: every check in `pricing::check` and
//! `check` (the edge parsers) over its seed corpus (`fuzz/corpus/<target>/`) and over every cut-short prefix of
//! each seed, so CI runs the same invariants the fuzzers do without nightly
//! or cargo-fuzz. Also keeps the harness complete: every target has a file
//! in `fuzz/fuzz_targets/` and seeds, and every pricing profile is fuzzed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use keycap_proto::profile::Profile;
use keycap_proxy::pricing::check::{
    quote, split_chunks, Check, Endpoint, FORM_ENDPOINTS, JSON_ENDPOINTS, SAMPLE_CALLS,
};

/// The proxy's fuzz checks: pricing parsers and edge parsers. (The control
/// plane's are run by its own `tests/fuzz_seeds.rs`.)
fn targets() -> impl Iterator<Item = &'static (&'static str, Check)> {
    keycap_proxy::pricing::check::TARGETS
        .iter()
        .chain(keycap_proxy::check::TARGETS)
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn names_in(dir: &Path, strip_ext: Option<&str>) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|name| match strip_ext {
            Some(ext) => name.strip_suffix(ext).map(str::to_string),
            None => Some(name),
        })
        .collect()
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = names_in(&dir, None)
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.join(&name)).unwrap();
            (name, bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_passes_its_seed_corpus() {
    for (target, check) in targets() {
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "fuzz/corpus/{target}/ has no seeds");
        for (name, bytes) in &seeds {
            check(bytes);
            // Cut-short inputs reach the refusal paths. Every prefix of
            // small seeds; larger ones at a stride, to keep CI quick.
            let stride = (bytes.len() / 64).max(1);
            for end in (0..bytes.len()).step_by(stride) {
                let prefix = &bytes[..end];
                if std::panic::catch_unwind(|| check(prefix)).is_err() {
                    panic!("{target}: seed {name} cut to {end} bytes");
                }
            }
        }
    }
}

/// The seeds reach past the parsers' refusals: every body-priced endpoint
/// quotes at least one of its target's seeds.
#[test]
fn seeds_quote_on_every_endpoint() {
    let reach = |target: &str, endpoints: &[Endpoint]| {
        let seeds = seeds(target);
        for ep in endpoints {
            assert!(
                seeds.iter().any(|(_, body)| quote(ep, body).is_ok()),
                "no seed in fuzz/corpus/{target}/ quotes on {ep:?}: add one"
            );
        }
    };
    reach("form_body", FORM_ENDPOINTS);
    reach("json_body", JSON_ENDPOINTS);
}

#[test]
fn checks_accept_degenerate_inputs() {
    for (_, check) in targets() {
        for input in [
            &b""[..],
            b"\0",
            b"\xff\xff",
            b"{}",
            b"[]",
            b"null",
            b"\n\n\r\r",
        ] {
            check(input);
        }
    }
}

#[test]
fn every_target_has_a_fuzz_binary_and_seeds() {
    let targets: BTreeSet<String> = targets().map(|(n, _)| n.to_string()).collect();
    // Binaries that fuzz the control plane are checked by its own tests.
    let is_ours = |name: &String| {
        let src = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        // (A corpus without a binary counts, so the comparison names it.)
        !std::fs::read_to_string(src).is_ok_and(|t| t.contains("keycap_control::"))
    };
    let binaries: BTreeSet<String> = names_in(&fuzz_dir().join("fuzz_targets"), Some(".rs"))
        .into_iter()
        .filter(is_ours)
        .collect();
    assert_eq!(
        targets, binaries,
        "pricing::check::TARGETS and check::TARGETS vs fuzz/fuzz_targets/"
    );
    let corpora: BTreeSet<String> = names_in(&fuzz_dir().join("corpus"), None)
        .into_iter()
        .filter(|c| binaries.contains(c) || targets.contains(c) || is_ours(c))
        .collect();
    assert_eq!(targets, corpora, "check TARGETS vs fuzz/corpus/");
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for t in &targets {
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{t}.rs\"")),
            "fuzz/Cargo.toml has no [[bin]] for {t}"
        );
    }
}

#[test]
fn every_profile_is_fuzzed() {
    for profile in Profile::ALL.map(Profile::as_str) {
        // A generic vendor's rules price by endpoint, never by body.
        let parsed = profile == "generic"
            || FORM_ENDPOINTS
                .iter()
                .chain(JSON_ENDPOINTS)
                .any(|e| e.profile == profile);
        assert!(
            parsed,
            "profile {profile} has no body-priced endpoint in pricing::check::FORM_ENDPOINTS \
             or JSON_ENDPOINTS: list the endpoints whose body it reads"
        );
        assert!(
            SAMPLE_CALLS.iter().any(|c| c.endpoint.profile == profile),
            "profile {profile} has no call in pricing::check::SAMPLE_CALLS to settle against"
        );
    }
}

#[test]
fn chunk_header_cuts_as_documented() {
    let (stream, cuts) = split_chunks(b"\x02\x03\x01abcdefgh");
    assert_eq!(stream, b"abcdefgh");
    assert_eq!(cuts, [&b"abc"[..], b"d", b"efg", b"h"]);
    let (stream, cuts) = split_chunks(b"\x00abc");
    assert_eq!((stream, cuts), (&b"abc"[..], vec![&b"abc"[..]]));
    // Zero sizes feed empty chunks and never stall.
    let (_, cuts) = split_chunks(b"\x02\x00\x00ab");
    assert_eq!(cuts, [&b""[..], b"", b"ab"]);
    let (_, cuts) = split_chunks(b"\x02\x00\x02abc");
    assert_eq!(cuts, [&b""[..], b"ab", b"", b"c"]);
    // More sizes announced than bytes follow: all of them are sizes.
    let (stream, _) = split_chunks(b"\x07\x01");
    assert!(stream.is_empty());
}
