//! Fuzz target: the sync protocol's JSON bodies (connect, poll, results and chunks), named commands and key creation.
//! The checks live in `syncrelay::relay::fuzzing::sync_json`, shared with the corpus replay
//! in `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    syncrelay::relay::fuzzing::sync_json(data);
});
