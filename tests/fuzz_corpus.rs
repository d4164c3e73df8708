//! Replays every seed of the fuzz corpora (`fuzz/corpus/<target>/`) through the
//! same checks the cargo-fuzz targets run (`fuzz/src/checks.rs`, included by
//! path), on the stable toolchain and in the normal test run. The fuzz crate
//! itself needs nightly and is excluded from the workspace; this keeps the checks
//! compiling and the corpora passing in CI. Crash inputs the fuzzer found are kept
//! as seeds too, so each is a regression test here.

#[path = "../fuzz/src/checks.rs"]
#[allow(dead_code)]
mod checks;

/// The gateway example's request bodies (`checks::gateway_bodies` fuzzes them).
#[path = "../examples/gateway/body.rs"]
#[allow(dead_code)]
mod body;

use std::path::Path;

#[test]
fn every_seed_of_every_target_passes_its_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in checks::TARGETS {
        let dir = root.join(target);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        seeds.sort();
        assert!(
            !seeds.is_empty(),
            "no seeds for {target} in {}",
            dir.display()
        );
        for seed in seeds {
            let data = std::fs::read(&seed).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "{target}: seed {} fails its checks",
                seed.display()
            );
        }
    }
}
