//! `/metrics` in Prometheus text format: every line parses, every series has a `# TYPE`,
//! histograms are cumulative, and the named series move with real traffic (a daemon
//! online and polling, client calls, a failed authentication, store flushes).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{eventually, TestRelay};

/// Samples by their full series name (`name{labels}`), and the declared types.
struct Exposition {
    samples: HashMap<String, f64>,
    types: HashMap<String, String>,
}

fn parse(text: &str) -> Exposition {
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type of {name}: {kind}"
            );
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        let name = series.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| types.get(*base).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(types.contains_key(base), "{name} has no # TYPE before it");
        samples.insert(series.to_owned(), value);
    }
    Exposition { samples, types }
}

async fn scrape(relay: &TestRelay) -> Exposition {
    let response = relay
        .http
        .get(format!("{}/metrics", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    parse(&response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_named_series_and_they_move() {
    // Sweeps (and their census: commands by state, bytes per tree) every 100 ms.
    let relay = TestRelay::start_with("[retention]\ninterval = \"100ms\"").await;
    let mut daemon = relay.daemon("d").await;
    daemon.connect().await;
    let client = relay.client(&["d"]).await;
    // A poll waits while we look.
    let poller = tokio::spawn({
        let daemon = relay.daemon("d2").await;
        async move {
            let mut daemon = daemon;
            daemon.connect().await;
            daemon.poll_raw(serde_json::json!([]), true, 5.0).await
        }
    });
    let bad = relay
        .http
        .get(format!("{}/api/v1/daemons", relay.url))
        .bearer_auth("srk_0000000000000000_00")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let ok = client
        .get("/api/v1/daemons/d/changes")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // One write queued for "d" and not yet taken: an unfinished command.
    let queued = client
        .post("/api/v1/daemons/d/things")
        .header("prefer", "respond-async")
        .json(&serde_json::json!({ "n": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 202);

    eventually(Duration::from_secs(10), || async {
        let m = scrape(&relay).await;
        m.samples["syncrelay_polls_waiting"] >= 1.0
            && m.samples.get("syncrelay_commands{state=\"queued\"}") == Some(&1.0)
    })
    .await;
    let m = scrape(&relay).await;
    for (name, kind) in [
        ("syncrelay_daemons_online", "gauge"),
        ("syncrelay_polls_waiting", "gauge"),
        ("syncrelay_connections_open", "gauge"),
        ("syncrelay_auth_failures_total", "counter"),
        ("syncrelay_rate_limited_total", "counter"),
        ("syncrelay_store_disk_bytes", "gauge"),
        ("syncrelay_daemons", "gauge"),
        ("syncrelay_commands_unfinished", "gauge"),
        ("syncrelay_request_duration_seconds", "histogram"),
        ("syncrelay_store_flush_seconds", "histogram"),
        ("syncrelay_store_flush_batch_size", "histogram"),
        ("syncrelay_commands", "gauge"),
        ("syncrelay_store_tree_bytes", "gauge"),
        ("syncrelay_store_tree_entries", "gauge"),
        ("syncrelay_store_census_timestamp_seconds", "gauge"),
        ("syncrelay_daemons_over_budget", "gauge"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    assert!(m.samples["syncrelay_daemons_online"] >= 2.0);
    assert_eq!(m.samples["syncrelay_daemons"], 2.0);
    assert_eq!(m.samples["syncrelay_commands_unfinished"], 1.0);
    assert!(m.samples["syncrelay_auth_failures_total"] >= 1.0);
    assert!(m.samples["syncrelay_store_disk_bytes"] > 0.0);
    assert!(m.samples["syncrelay_store_flush_seconds_count"] >= 1.0);
    assert!(m.samples["syncrelay_store_flush_batch_size_count"] >= 1.0);
    for state in ["delivered", "completed", "failed", "expired"] {
        assert_eq!(
            m.samples[&format!("syncrelay_commands{{state=\"{state}\"}}")],
            0.0
        );
    }
    for tree in ["commands", "queue", "daemons", "credentials"] {
        assert!(m.samples[&format!("syncrelay_store_tree_bytes{{tree=\"{tree}\"}}")] > 0.0);
        assert!(m.samples[&format!("syncrelay_store_tree_entries{{tree=\"{tree}\"}}")] >= 1.0);
    }
    assert_eq!(m.samples["syncrelay_daemons_over_budget"], 0.0);
    for family in ["sync", "client", "admin", "health", "other"] {
        let mut previous = 0.0;
        let mut buckets = 0;
        for (series, value) in &m.samples {
            if series.starts_with(&format!(
                "syncrelay_request_duration_seconds_bucket{{family=\"{family}\","
            )) {
                buckets += 1;
                previous = f64::max(previous, *value);
            }
        }
        assert!(buckets > 1, "{family} has buckets");
        let count =
            m.samples[&format!("syncrelay_request_duration_seconds_count{{family=\"{family}\"}}")];
        let inf = m.samples[&format!(
            "syncrelay_request_duration_seconds_bucket{{family=\"{family}\",le=\"+Inf\"}}"
        )];
        assert_eq!(inf, count, "{family}: +Inf bucket equals the count");
        assert_eq!(previous, inf, "{family}: buckets are cumulative");
    }
    for family in ["sync", "client", "admin"] {
        let count =
            m.samples[&format!("syncrelay_request_duration_seconds_count{{family=\"{family}\"}}")];
        assert!(count >= 1.0, "{family} requests were timed");
    }
    poller.abort();
}
