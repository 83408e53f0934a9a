//! Replays every fuzz seed (`tests/fuzz/seeds/`) and every input that once
//! made a fuzz target fail (`tests/fuzz/regressions/`) through the checks the
//! fuzz targets run, so the test suite keeps them passing without a fuzzer.

#[path = "fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// A fuzz target's checks: panics on a failure.
type Check = fn(&[u8]);

#[test]
fn every_seed_and_recorded_failure_passes_its_fuzz_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let targets: [(&str, Check); 3] = [
        ("notify_body", checks::notify_body),
        ("socket_auth", checks::socket_auth),
        ("tokens", checks::tokens),
    ];
    for (target, check) in targets {
        let mut replayed = 0;
        for kind in ["seeds", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let input = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| check(&input));
                assert!(outcome.is_ok(), "{} fails its checks", path.display());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "{target} has seeds");
    }
}
