//! The fuzz targets' checks on the stable toolchain, in the normal test run: every input
//! that once crashed a target (`fuzz/regressions/<target>/`), the local corpus when one
//! exists (`fuzz/corpus/<target>/`, git-ignored), and a fixed, seeded set of mutations of
//! hand-written seeds. The coverage-guided runs themselves are `cargo +nightly fuzz run`
//! (RELIABILITY.md); this keeps what they found fixed, and checks the entries on every
//! machine, nightly or not.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("sync_json", syncrelay::relay::fuzzing::sync_json),
    ("client_params", syncrelay::relay::fuzzing::client_params),
    ("sse_framing", syncrelay::relay::fuzzing::sse_framing),
    ("stored_value", syncrelay::store::fuzzing::stored_value),
];

/// Mutations run per target on top of the files.
const MUTATIONS: usize = 3_000;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let text: &[&str] = match target {
        "sync_json" => &[
            r#"{"daemon_id":"d1","version":"1.0.0","capabilities":["approvals"]}"#,
            r#"{"daemon_id":"d1","updates":[{"type":"session_created","data":{"id":"s1"},"timestamp":"2026-01-01T00:00:00Z","seq":42}],"wait_for_commands":true,"timeout":30}"#,
            r#"{"daemon_id":"d1","results":[{"command_id":"cmd-1","result":{"status":200,"headers":{},"body":[1,2.5e3,null]},"error":null}]}"#,
            r#"{"daemon_id":"d1","results":[{"command_id":"cmd-1","chunk":0,"status":200,"headers":{"a":"b"},"data":"x","complete":false},{"command_id":"cmd-1","chunk":1,"data_base64":"AAE=","complete":true}]}"#,
            r#"{"method":"getApproval","params":{"approval_id":"a1"}}"#,
            r#"{"role":"client","scope":["*"],"label":"phone"}"#,
        ],
        "client_params" => &[
            "/api/v1/daemons/d1/changes?since=41&limit=10&wait=2.5\nprefer: wait=10, respond-async\nidempotency-key: k1\n\n{\"a\":[1]}",
            "/api/v1/daemons/d1/sessions?access_token=x&acc%65ss_token=y&leafOnly=true\nconnection: x-a, close\nx-a: 1\ncookie: c\nauthorization: Bearer t\ncontent-type: application/json\n\n[[[]]]",
            "/api/v1/daemons/d1/stream/events?since=2026-01-01T00:00:00Z&eventTypes=a\nlast-event-id: 3\n\n",
            "/api/v1/daemons/../%2e%2e/approvals/a1/context/stream\n\n",
        ],
        "sse_framing" => &[
            "\u{2}\u{5}id: 7\ndata: a\n\n: keep-alive\n\nevent: x\r\ndata: b\r\n\r\ndata: c",
            "\u{0}\u{1}data: a\n\n\ndata: b\r\rdata: c\n\n",
        ],
        "stored_value" => &[
            "\u{1}\u{5}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}hello",
            "syncrelay seal v1\ncommits 5\ncheck 8a68e6a8e648725f\n",
        ],
        _ => &[],
    };
    text.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(&path).expect("read input");
            (path.display().to_string(), bytes)
        })
        .collect();
    out.sort();
    out
}

/// One random edit of `input`: flip, insert, delete, duplicate a span, or splice in a
/// byte that matters to the decoders.
fn mutate(rng: &mut StdRng, input: &mut Vec<u8>) {
    const INTERESTING: &[u8] = b"{}[]\",:\\\n\r-+.eE0%\x00\xff";
    let at = if input.is_empty() {
        0
    } else {
        rng.gen_range(0..input.len())
    };
    match rng.gen_range(0..5) {
        0 if !input.is_empty() => input[at] ^= 1 << rng.gen_range(0..8),
        1 => input.insert(at, INTERESTING[rng.gen_range(0..INTERESTING.len())]),
        2 if !input.is_empty() => {
            input.remove(at);
        }
        3 if !input.is_empty() => {
            let end = (at + rng.gen_range(1..16)).min(input.len());
            let span = input[at..end].to_vec();
            let to = rng.gen_range(0..=input.len());
            input.splice(to..to, span);
        }
        _ => input.insert(at, rng.gen()),
    }
}

#[test]
fn fuzz_regressions_corpus_and_mutations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut regressions = 0;
    for (name, target) in TARGETS {
        let mut inputs = files(&root.join("regressions").join(name));
        regressions += inputs.len();
        inputs.extend(files(&root.join("corpus").join(name)));
        for (path, bytes) in &inputs {
            let outcome = std::panic::catch_unwind(|| target(bytes));
            assert!(outcome.is_ok(), "{name}: {path} breaks an invariant");
        }
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has seeds");
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for round in 0..MUTATIONS {
            let mut input = seeds[round % seeds.len()].clone();
            for _ in 0..rng.gen_range(1..8) {
                mutate(&mut rng, &mut input);
            }
            let outcome = std::panic::catch_unwind(|| target(&input));
            assert!(
                outcome.is_ok(),
                "{name}: mutation {round} breaks an invariant: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
    assert!(regressions >= 3, "the regression inputs are checked in");
}
