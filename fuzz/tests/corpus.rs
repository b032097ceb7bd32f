//! Every committed corpus file (`fuzz/corpus/<target>/`) through its target, as an ordinary
//! test: an input that once crashed a target stays fixed. Then a short mutation run with a fixed
//! seed and a fixed number of inputs per target (deterministic, no time limit).
use std::path::Path;

use nodeway_fuzz::{engine, TARGETS};

#[test]
fn every_corpus_file_passes_its_target() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut failures = Vec::new();
    let mut files = 0;
    for t in TARGETS {
        let seeds = engine::load_corpus(&corpus, t.name).expect("corpus readable");
        assert!(
            !seeds.is_empty(),
            "fuzz target {} has no corpus under {}",
            t.name,
            corpus.display()
        );
        for (path, data) in seeds {
            files += 1;
            if let Err(msg) = engine::run_one(t, &data) {
                failures.push(format!("{}: {} ({})", t.name, msg, path.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {files} corpus files crash:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_corpus_directory_is_a_target() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for e in std::fs::read_dir(&corpus).expect("corpus dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            nodeway_fuzz::target(&name).is_some(),
            "corpus/{name} names no fuzz target"
        );
    }
}

#[test]
fn a_fixed_mutation_run_finds_nothing() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for t in TARGETS {
        let pool: Vec<Vec<u8>> = engine::load_corpus(&corpus, t.name)
            .expect("corpus readable")
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        let mut m = engine::Mutator::new(15, t);
        for _ in 0..300 {
            let input = m.next(&pool);
            if let Err(msg) = engine::run_one(t, &input) {
                panic!(
                    "fuzz target {} crashed: {msg}\ninput: {}",
                    t.name,
                    engine::escape(&input)
                );
            }
        }
    }
}
