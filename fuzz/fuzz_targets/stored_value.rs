//! Fuzz target: stored-value decoding of a damaged store: every record type, large-value pointers, the seal.
//! The checks live in `syncrelay::store::fuzzing::stored_value`, shared with the corpus replay
//! in `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    syncrelay::store::fuzzing::stored_value(data);
});
