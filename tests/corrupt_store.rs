//! Corrupted store: a data dir whose database file was truncated or had bits flipped makes
//! `syncrelay serve` refuse to start with a clear message, instead of serving wrong data
//! or silently dropping what it had acknowledged. A copy that still comes up must answer
//! for every command acknowledged before the damage.

mod common;

use std::path::Path;
use std::process::Command;

use common::RelayProcess;
use serde_json::json;

/// A relay run on `dir` that acknowledged `n` writes and then stopped cleanly: their ids
/// and the client key.
async fn filled(dir: &Path, n: usize) -> (Vec<String>, String) {
    let relay = RelayProcess::spawn(dir);
    let (daemon, client) = relay.daemon_and_client_keys("d").await;
    let http = reqwest::Client::new();
    http.post(format!("{}/sync/connect", relay.url))
        .bearer_auth(&daemon)
        .json(&json!({ "daemon_id": "d" }))
        .send()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let response = http
            .post(format!("{}/api/v1/daemons/d/jobs", relay.url))
            .bearer_auth(&client)
            .header("prefer", "respond-async")
            .json(&json!({ "n": i, "pad": "x".repeat(200) }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: serde_json::Value = response.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let pid = relay.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let mut relay = relay;
    relay.child.wait().unwrap();
    (ids, client)
}

/// How `syncrelay serve` on a data dir ended up.
enum Start {
    /// It came up (and was stopped again): every id of `ids` it could not answer.
    Served { missing: Vec<String> },
    /// It exited at once with this on stderr.
    Refused { success: bool, stderr: String },
}

/// Starts `syncrelay serve` on `dir`. If it comes up, asks it for every command in `ids`.
async fn start(dir: &Path, ids: &[String], client: &str) -> Start {
    let relay = match RelayProcess::try_spawn(dir) {
        Ok(relay) => relay,
        Err((success, stderr)) => return Start::Refused { success, stderr },
    };
    let http = reqwest::Client::new();
    let mut missing = Vec::new();
    for id in ids {
        let response = http
            .get(format!("{}/api/v1/commands/{id}", relay.url))
            .bearer_auth(client)
            .send()
            .await;
        if !matches!(response, Ok(ref r) if r.status() == 200) {
            missing.push(id.clone());
        }
    }
    relay.kill();
    Start::Served { missing }
}

/// The damage done to a copy of the data dir.
enum Damage {
    Flip(usize),
    Truncate(usize),
    SealEdited,
    /// A high bit flipped in the seal: no longer UTF-8, still damaged (not unreadable).
    SealFlipped,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_is_refused_never_served_short() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ids, client) = filled(&data, 300).await;
    let db = std::fs::read(data.join("db/db")).unwrap();

    // The undamaged copy serves everything.
    let control = dir.path().join("control");
    copy_dir(&data, &control);
    match start(&control, &ids, &client).await {
        Start::Served { missing } => assert!(missing.is_empty(), "lost {missing:?}"),
        Start::Refused { stderr, .. } => panic!("an intact data dir was refused: {stderr}"),
    }

    let mut damages: Vec<Damage> = (1..=16).map(|i| Damage::Flip(db.len() * i / 17)).collect();
    damages.extend((1..=4).map(|i| Damage::Truncate(db.len() * i / 5)));
    damages.push(Damage::SealEdited);
    damages.push(Damage::SealFlipped);
    let mut refused = 0;
    for (n, damage) in damages.iter().enumerate() {
        let copy = dir.path().join(format!("copy-{n}"));
        copy_dir(&data, &copy);
        let what = match *damage {
            Damage::Flip(at) => {
                let mut bytes = db.clone();
                bytes[at] ^= 0x10;
                std::fs::write(copy.join("db/db"), bytes).unwrap();
                format!("bit flipped at byte {at} of {}", db.len())
            }
            Damage::Truncate(at) => {
                std::fs::write(copy.join("db/db"), &db[..at]).unwrap();
                format!("truncated to {at} of {} bytes", db.len())
            }
            Damage::SealEdited => {
                let seal = copy.join("store.seal");
                let text = std::fs::read_to_string(&seal).unwrap();
                std::fs::write(&seal, text.replace("commits ", "commits 1")).unwrap();
                "seal edited".to_owned()
            }
            Damage::SealFlipped => {
                let seal = copy.join("store.seal");
                let mut bytes = std::fs::read(&seal).unwrap();
                bytes[3] ^= 0x80;
                std::fs::write(&seal, bytes).unwrap();
                "seal bit-flipped into invalid UTF-8".to_owned()
            }
        };
        match start(&copy, &ids, &client).await {
            // Damage where nothing live was stored may be harmless; then nothing is lost.
            Start::Served { missing } => {
                assert!(missing.is_empty(), "{what}: served without {missing:?}");
                assert!(
                    matches!(damage, Damage::Flip(_)),
                    "{what}: served, not refused"
                );
            }
            Start::Refused { success, stderr } => {
                assert!(!success, "{what}: exit status 0");
                // The copies' names do not contain the words looked for.
                let expected = match damage {
                    // Its check no longer matches (a seal ahead of the database with a valid
                    // check is the unit test in src/store/seal.rs).
                    Damage::SealEdited | Damage::SealFlipped => {
                        "is damaged; it is not the file syncrelay writes"
                    }
                    Damage::Flip(_) | Damage::Truncate(_) => "damaged",
                };
                assert!(
                    stderr.contains(expected) && stderr.contains(copy.to_str().unwrap()),
                    "{what}: unclear message (want {expected:?}): {stderr}"
                );
                refused += 1;
            }
        }
    }
    eprintln!("{refused} of {} damaged copies refused", damages.len());
    assert!(refused >= damages.len() / 2);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
