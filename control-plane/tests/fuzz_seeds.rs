//! The control plane's fuzz checks on stable: every check in
//! `keycap_control::check` over its seed corpus (`fuzz/corpus/<target>/`)
//! and every cut-short prefix of each seed, as the proxy's
//! `tests/fuzz_seeds.rs` does for its own; and every target has a fuzz
//! binary and seeds.

use std::path::{Path, PathBuf};

use keycap_control::check::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_passes_its_seed_corpus() {
    for (target, check) in TARGETS {
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "fuzz/corpus/{target}/ has no seeds");
        for (name, bytes) in &seeds {
            check(bytes);
            for end in 0..bytes.len() {
                if std::panic::catch_unwind(|| check(&bytes[..end])).is_err() {
                    panic!("{target}: seed {name} cut to {end} bytes");
                }
            }
        }
    }
}

/// The seeds reach past the refusals: each kind of body is accepted by at
/// least one seed and refused by another.
#[test]
fn seeds_reach_acceptance_and_refusal() {
    let seeds = seeds("rest_body");
    for which in [0u8, 1] {
        let bodies: Vec<&[u8]> = seeds
            .iter()
            .filter(|(_, b)| b.first().is_some_and(|w| w % 2 == which))
            .map(|(_, b)| &b[1..])
            .collect();
        let accepted = |b: &[u8]| match which {
            0 => keycap_control::rest::create_key_body(b).is_ok(),
            _ => keycap_control::rest::put_vendor_body("vendor-1", b).is_ok(),
        };
        assert!(
            bodies.iter().any(|b| accepted(b)),
            "no seed of kind {which} is accepted"
        );
        assert!(
            bodies.iter().any(|b| !accepted(b)),
            "no seed of kind {which} is refused"
        );
    }
}

#[test]
fn every_target_has_a_fuzz_binary() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (t, _) in TARGETS {
        let src = fuzz_dir().join("fuzz_targets").join(format!("{t}.rs"));
        let text =
            std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        assert!(
            text.contains(&format!("keycap_control::check::{t}")),
            "{}",
            src.display()
        );
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{t}.rs\"")),
            "fuzz/Cargo.toml has no [[bin]] for {t}"
        );
    }
}
