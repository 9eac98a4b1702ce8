//! Fuzz target: the SSE framing of stored stream chunks: chunking-independent, numbered, resumable.
//! The checks live in `syncrelay::relay::fuzzing::sse_framing`, shared with the corpus replay
//! in `tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    syncrelay::relay::fuzzing::sse_framing(data);
});
