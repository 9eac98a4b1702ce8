//! Fuzz target: the client API's parameters: query, headers, path segments and mirrored bodies.
//! The checks live in `syncrelay::relay::fuzzing::client_params`, shared with the corpus replay
//! in `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    syncrelay::relay::fuzzing::client_params(data);
});
