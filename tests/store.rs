//! The store's conformance suite: one source, run against every backend. Each test takes a
//! fresh [`Store`] on sled (a temp dir) and then on PostgreSQL (a database of its own in
//! this process's throwaway cluster; one loud `SKIPPED:` line where PostgreSQL is not
//! installed) and checks the domain rules through the API the relay uses: the command
//! life (queue limit, `Idempotency-Key`, lease and redelivery, reconnect, expiry, first
//! result wins), the change log (dedupe by the daemon's `seq`, pages, times), contexts
//! (one shared fetch, chunk order, retries, a refetch cut otherwise, the size limit),
//! keys, cached responses and retention.

mod common;

use std::future::Future;
use std::time::Duration;

use syncrelay::store::{
    CachedResponse, ChunkLimits, ChunkOutcome, CommandState, CompleteOutcome, ContextRequest,
    ContextState, KeyRecord, Maintenance, NewChange, NewChunk, NewCommand, Opened, Posted,
    PostedOutcome, RetentionPolicy, Role, Store, StoreError, StoreSettings,
};

/// Runs `test` on a fresh store of each backend, naming the backend on failure.
async fn each_backend<F, Fut>(test: &str, check: F)
where
    F: Fn(Store, &'static str) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let sled = Store::open(&StoreSettings::Sled(dir.path().to_owned()))
        .await
        .expect("sled opens");
    check(sled, "sled").await;
    let Some(cluster) = common::postgres::shared(test) else {
        return;
    };
    let database = common::postgres::create_database(cluster).await;
    let settings = syncrelay::store::postgres::PgSettings {
        url: cluster.url(&database),
        pool_size: 4,
        statement_timeout: Duration::from_secs(30),
        allow_unsafe_durability: false,
        node: None,
    };
    let pg = Store::open(&StoreSettings::Postgres(settings))
        .await
        .expect("PostgreSQL opens");
    check(pg, "postgres").await;
}

fn command(daemon: &str, idempotency: Option<&str>, limit: u64) -> NewCommand {
    NewCommand {
        daemon_id: daemon.into(),
        method: "http".into(),
        params_json: "{\"method\":\"POST\"}".into(),
        stream: false,
        ttl_ms: 1_000,
        idempotency: idempotency.map(|key| ("k1".to_owned(), key.to_owned())),
        queue_limit: limit,
    }
}

fn result(command_id: &str, body: &str) -> Posted {
    Posted::Result {
        command_id: command_id.into(),
        result_json: Some(body.into()),
        error_json: None,
    }
}

const LIMITS: ChunkLimits = ChunkLimits {
    max_context_bytes: 100,
    lease_ms: 1_000,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_lease_redeliver_and_the_first_result_wins() {
    let test = "commands_lease_redeliver_and_the_first_result_wins";
    each_backend(test, |store, backend| async move {
        store.ensure_daemon("d", 0).await.unwrap();
        let a = store.enqueue(command("d", None, 10), 0).await.unwrap();
        let b = store.enqueue(command("d", None, 10), 0).await.unwrap();
        assert!(a.created && b.created, "{backend}");
        let batch = store.lease("d", None, 10, 100, 10).await.unwrap();
        let ids: Vec<&str> = batch.commands.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            [a.command.id.as_str(), b.command.id.as_str()],
            "{backend}: queue order"
        );
        // Leased: nothing now; a wake-up is due when the first lease runs out.
        let batch = store.lease("d", None, 10, 100, 50).await.unwrap();
        assert!(batch.commands.is_empty(), "{backend}");
        assert_eq!(batch.next_lease_expiry_ms, Some(110), "{backend}");
        let outcomes = store
            .post_results(
                "d",
                vec![
                    result(&a.command.id, "1"),
                    result(&a.command.id, "2"),
                    result("cmd-unknown", "3"),
                ],
                LIMITS,
                60,
            )
            .await
            .unwrap();
        assert!(
            matches!(
                outcomes[0],
                PostedOutcome::Result(CompleteOutcome::Completed(_))
            ),
            "{backend}"
        );
        assert!(
            matches!(
                outcomes[1],
                PostedOutcome::Result(CompleteOutcome::Duplicate)
            ),
            "{backend}"
        );
        assert!(
            matches!(outcomes[2], PostedOutcome::Result(CompleteOutcome::Unknown)),
            "{backend}"
        );
        // Another daemon cannot answer d's command.
        store.ensure_daemon("e", 0).await.unwrap();
        let other = store
            .post_results("e", vec![result(&b.command.id, "x")], LIMITS, 61)
            .await
            .unwrap();
        assert!(
            matches!(other[0], PostedOutcome::Result(CompleteOutcome::Unknown)),
            "{backend}"
        );
        // b's lease ran out: it goes out again.
        let batch = store.lease("d", None, 10, 100, 111).await.unwrap();
        assert_eq!(batch.commands.len(), 1, "{backend}");
        assert_eq!(batch.commands[0].id, b.command.id, "{backend}");
        assert_eq!(batch.commands[0].deliveries, 2, "{backend}");
        let stored = store.command(&a.command.id, 200).await.unwrap().unwrap();
        assert_eq!(stored.state, CommandState::Completed, "{backend}");
        assert_eq!(
            stored.result_json.as_deref(),
            Some("1"),
            "{backend}: first wins"
        );
        assert_eq!(
            store.daemon("d").await.unwrap().unwrap().queued,
            1,
            "{backend}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_limit_idempotency_expiry_and_unknown_daemons() {
    let test = "queue_limit_idempotency_expiry_and_unknown_daemons";
    each_backend(test, |store, backend| async move {
        store.ensure_daemon("d", 0).await.unwrap();
        let first = store.enqueue(command("d", Some("x"), 3), 0).await.unwrap();
        let again = store.enqueue(command("d", Some("x"), 3), 5).await.unwrap();
        assert!(first.created && !again.created, "{backend}");
        assert_eq!(first.command.id, again.command.id, "{backend}");
        store.enqueue(command("d", None, 3), 0).await.unwrap();
        store.enqueue(command("d", None, 3), 0).await.unwrap();
        assert!(
            matches!(
                store.enqueue(command("d", None, 3), 0).await,
                Err(StoreError::QueueFull { limit: 3, .. })
            ),
            "{backend}"
        );
        // Past the TTL: a reader sees `expired` the moment it is due, a poll gets nothing.
        let expired = store
            .command(&first.command.id, 2_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(expired.state, CommandState::Expired, "{backend}");
        let batch = store.lease("d", None, 10, 100, 2_000).await.unwrap();
        assert!(batch.commands.is_empty(), "{backend}");
        assert_eq!(
            store.daemon("d").await.unwrap().unwrap().queued,
            0,
            "{backend}"
        );
        let late = store
            .post_results("d", vec![result(&first.command.id, "1")], LIMITS, 2_001)
            .await
            .unwrap();
        assert!(
            matches!(late[0], PostedOutcome::Result(CompleteOutcome::Unknown)),
            "{backend}"
        );
        assert!(
            matches!(
                store.enqueue(command("nobody", None, 3), 0).await,
                Err(StoreError::UnknownDaemon(_))
            ),
            "{backend}"
        );
    })
    .await;
}

/// Writers at once (PostgreSQL inserts what arrives together in one statement, sled
/// flushes it in one group commit): each gets its own answer, as if it had been alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_each_get_their_own_answer() {
    let test = "concurrent_writers_each_get_their_own_answer";
    each_backend(test, |store, backend| async move {
        store.ensure_daemon("d", 0).await.unwrap();
        let store = std::sync::Arc::new(store);
        let writers: Vec<_> = (0..120)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let new = match n % 4 {
                        0 => command("nobody", None, 1_000),
                        1 => command("d", Some("same"), 1_000),
                        _ => command("d", None, 1_000),
                    };
                    (n, store.enqueue(new, 0).await)
                })
            })
            .collect();
        let mut fresh = Vec::new();
        let mut keyed = std::collections::BTreeSet::new();
        let mut keyed_created = 0;
        for writer in writers {
            let (n, outcome) = writer.await.unwrap();
            match n % 4 {
                0 => assert!(
                    matches!(outcome, Err(StoreError::UnknownDaemon(_))),
                    "{backend}: a command for no daemon is refused"
                ),
                1 => {
                    let outcome = outcome.unwrap();
                    keyed_created += usize::from(outcome.created);
                    keyed.insert(outcome.command.id);
                }
                _ => {
                    let outcome = outcome.unwrap();
                    assert!(outcome.created, "{backend}");
                    fresh.push(outcome.command);
                }
            }
        }
        assert_eq!(
            (keyed.len(), keyed_created),
            (1, 1),
            "{backend}: one command for one key, created once"
        );
        let mut queued: Vec<(u64, String)> =
            fresh.iter().map(|c| (c.queue_seq, c.id.clone())).collect();
        queued.push({
            let id = keyed.first().unwrap();
            let keyed = store.command(id, 0).await.unwrap().unwrap();
            (keyed.queue_seq, keyed.id)
        });
        queued.sort();
        queued.dedup_by_key(|(seq, _)| *seq);
        assert_eq!(
            queued.len(),
            61,
            "{backend}: each has a queue position of its own"
        );
        // The daemon gets them all, in the positions they were answered with.
        let leased = store.lease("d", None, 100, 1_000, 0).await.unwrap();
        let leased: Vec<String> = leased.commands.into_iter().map(|c| c.id).collect();
        let answered: Vec<String> = queued.into_iter().map(|(_, id)| id).collect();
        assert_eq!(leased, answered, "{backend}");
    })
    .await;
}

/// The operator's view (the console): one daemon's commands, unfinished first, then
/// finished, newest first; its cached contexts; nothing of another daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_view_lists_a_daemons_commands_and_contexts() {
    let test = "the_operators_view_lists_a_daemons_commands_and_contexts";
    each_backend(test, |store, backend| async move {
        store.ensure_daemon("d", 0).await.unwrap();
        store.ensure_daemon("e", 0).await.unwrap();
        let first = store.enqueue(command("d", None, 10), 0).await.unwrap();
        let second = store.enqueue(command("d", None, 10), 1).await.unwrap();
        let third = store.enqueue(command("d", None, 10), 2).await.unwrap();
        store.enqueue(command("e", None, 10), 3).await.unwrap();
        let leased = store.lease("d", None, 2, 1_000, 4).await.unwrap();
        assert_eq!(leased.commands.len(), 2, "{backend}");
        let finished = vec![
            result(&first.command.id, "1"),
            result(&second.command.id, "2"),
        ];
        store.post_results("d", finished, LIMITS, 5).await.unwrap();
        let ids = |list: Vec<syncrelay::store::CommandRecord>| -> Vec<String> {
            list.into_iter().map(|c| c.id).collect()
        };
        assert_eq!(
            ids(store.recent_commands("d", 10).await.unwrap()),
            [
                third.command.id.clone(),
                second.command.id.clone(),
                first.command.id.clone()
            ],
            "{backend}: unfinished, then finished newest first"
        );
        assert_eq!(
            ids(store.recent_commands("d", 2).await.unwrap()),
            [third.command.id.clone(), second.command.id.clone()],
            "{backend}: at most the limit"
        );
        assert!(store
            .recent_commands("nobody", 10)
            .await
            .unwrap()
            .is_empty());

        assert!(store.daemon_contexts("d", 10).await.unwrap().is_empty());
        store.open_context(context_request(false), 6).await.unwrap();
        let contexts = store.daemon_contexts("d", 10).await.unwrap();
        assert_eq!(contexts.len(), 1, "{backend}");
        assert_eq!(contexts[0].key, "/api/v1/approvals/a1/context/stream");
        assert!(store.daemon_contexts("e", 10).await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_releases_leases_and_supersedes_the_old_connection() {
    let test = "a_reconnect_releases_leases_and_supersedes_the_old_connection";
    each_backend(test, |store, backend| async move {
        store
            .connect_daemon("d", Some("1.0".into()), vec!["x".into()], "c1", 0)
            .await
            .unwrap();
        store.enqueue(command("d", None, 10), 0).await.unwrap();
        let leased = store.lease("d", Some("c1"), 10, 100, 1).await.unwrap();
        assert_eq!(leased.commands.len(), 1, "{backend}");
        let record = store
            .connect_daemon("d", Some("1.1".into()), vec![], "c2", 2)
            .await
            .unwrap();
        assert_eq!(record.version.as_deref(), Some("1.1"), "{backend}");
        assert_eq!(record.created_at_ms, 0, "{backend}");
        assert!(
            matches!(
                store.lease("d", Some("c1"), 10, 100, 3).await,
                Err(StoreError::Superseded)
            ),
            "{backend}"
        );
        let again = store.lease("d", Some("c2"), 10, 100, 3).await.unwrap();
        assert_eq!(again.commands.len(), 1, "{backend}: released at once");
        assert_eq!(store.daemons().await.unwrap().len(), 1, "{backend}");
    })
    .await;
}

fn change(kind: &str, seq: Option<u64>, timestamp_ms: Option<u64>) -> NewChange {
    NewChange {
        kind: kind.into(),
        timestamp_ms,
        data_json: format!("{{\"k\":\"{kind}\"}}"),
        daemon_seq: seq,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_log_drops_retries_and_pages_in_order() {
    let test = "the_change_log_drops_retries_and_pages_in_order";
    each_backend(test, |store, backend| async move {
        store.ensure_daemon("d", 0).await.unwrap();
        let first = store
            .append_changes(
                "d",
                vec![
                    change("a", Some(1), Some(100)),
                    change("b", Some(2), Some(200)),
                ],
                1_000,
            )
            .await
            .unwrap();
        assert_eq!(
            (first.appended, first.last_update_seq, first.last_change_seq),
            (2, 2, 2),
            "{backend}"
        );
        // A resent batch: only what is new goes in.
        let again = store
            .append_changes(
                "d",
                vec![
                    change("b", Some(2), Some(200)),
                    change("c", Some(3), Some(300)),
                    change("unnumbered", None, None),
                ],
                2_000,
            )
            .await
            .unwrap();
        assert_eq!(
            (again.appended, again.last_update_seq, again.last_change_seq),
            (2, 3, 4),
            "{backend}"
        );
        let page = store.changes_page("d", 0, 100, usize::MAX).await.unwrap();
        let kinds: Vec<&str> = page.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["a", "b", "c", "unnumbered"], "{backend}");
        assert_eq!(
            page.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4],
            "{backend}"
        );
        assert_eq!(
            page[3].timestamp_ms, 2_000,
            "{backend}: the relay's clock when absent"
        );
        assert_eq!(page[0].data_json, "{\"k\":\"a\"}", "{backend}");
        assert_eq!(
            store.changes_page("d", 2, 1, usize::MAX).await.unwrap()[0].kind,
            "c",
            "{backend}"
        );
        // A byte budget still returns at least one entry.
        assert_eq!(
            store.changes_page("d", 0, 100, 1).await.unwrap().len(),
            1,
            "{backend}"
        );
        assert_eq!(
            store.seq_before_time("d", 150).await.unwrap(),
            1,
            "{backend}"
        );
        assert_eq!(
            store.seq_before_time("d", 50).await.unwrap(),
            0,
            "{backend}"
        );
        assert_eq!(
            store.seq_before_time("d", 9_999).await.unwrap(),
            4,
            "{backend}"
        );
        assert!(
            store
                .changes_page("other", 0, 10, usize::MAX)
                .await
                .unwrap()
                .is_empty(),
            "{backend}"
        );
        assert!(
            matches!(
                store
                    .append_changes("nobody", vec![change("x", None, None)], 0)
                    .await,
                Err(StoreError::UnknownDaemon(_))
            ),
            "{backend}"
        );
    })
    .await;
}

fn context_request(refresh: bool) -> ContextRequest {
    ContextRequest {
        daemon_id: "d".into(),
        key: "/api/v1/approvals/a1/context/stream".into(),
        params_json: "{\"method\":\"GET\"}".into(),
        refresh,
        ttl_ms: 10_000,
        command_ttl_ms: 10_000,
        queue_limit: 10,
    }
}

fn chunk(command_id: &str, index: u64, data: &[u8], complete: bool) -> Posted {
    Posted::Chunk {
        command_id: command_id.into(),
        chunk: NewChunk {
            index,
            status: Some(200),
            headers: vec![("content-type".into(), "text/event-stream".into())],
            data: data.to_vec(),
            complete,
            error_json: None,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_is_fetched_once_in_order_and_replayed() {
    let test = "a_context_is_fetched_once_in_order_and_replayed";
    each_backend(test, |store, backend| async move {
        store.ensure_daemon("d", 0).await.unwrap();
        let Opened::Started(record) = store.open_context(context_request(false), 0).await.unwrap() else {
            panic!("{backend}: a first request starts a fetch");
        };
        let Opened::Existing(shared) = store.open_context(context_request(false), 1).await.unwrap() else {
            panic!("{backend}: a second request shares the fetch");
        };
        assert_eq!(shared.context_id, record.context_id, "{backend}");
        let leased = store.lease("d", None, 10, 1_000, 2).await.unwrap();
        assert_eq!(leased.commands.len(), 1, "{backend}");
        assert!(leased.commands[0].stream, "{backend}");
        let id = record.command_id.clone();
        let outcomes = store
            .post_results(
                "d",
                vec![chunk(&id, 0, b"one ", false), chunk(&id, 0, b"one ", false), chunk(&id, 2, b"x", false), chunk(&id, 1, b"never", false)],
                LIMITS,
                3,
            )
            .await
            .unwrap();
        assert_eq!(outcomes.len(), 3, "{backend}: the post stops at the gap");
        assert!(matches!(outcomes[0], PostedOutcome::Chunk(ChunkOutcome::Stored(_))), "{backend}");
        assert!(matches!(outcomes[1], PostedOutcome::Chunk(ChunkOutcome::Duplicate(_))), "{backend}");
        assert!(matches!(outcomes[2], PostedOutcome::Chunk(ChunkOutcome::Gap { expected: 1 })), "{backend}");
        let outcomes = store
            .post_results("d", vec![chunk(&id, 1, b"two", true)], LIMITS, 4)
            .await
            .unwrap();
        let PostedOutcome::Chunk(ChunkOutcome::Stored(done)) = &outcomes[0] else {
            panic!("{backend}: {outcomes:?}");
        };
        assert_eq!(done.state, ContextState::Complete, "{backend}");
        assert_eq!((done.chunks, done.bytes), (2, 7), "{backend}");
        assert_eq!(done.status, Some(200), "{backend}");
        assert_eq!(done.headers, [("content-type".to_owned(), "text/event-stream".to_owned())], "{backend}");
        let (read, chunks) = store.read_context(record.context_id, 0, 10, false).await.unwrap().unwrap();
        assert_eq!(read.state, ContextState::Complete, "{backend}");
        assert_eq!(chunks, [b"one ".to_vec(), b"two".to_vec()], "{backend}");
        let (_, tail) = store.read_context(record.context_id, 1, 10, true).await.unwrap().unwrap();
        assert_eq!(tail, [b"two".to_vec()], "{backend}");
        let command = store.command(&id, 5).await.unwrap().unwrap();
        assert_eq!(command.state, CommandState::Completed, "{backend}: the command ends with its context");
        // Complete and fresh: served from the store, not fetched again.
        assert!(matches!(store.open_context(context_request(false), 6).await.unwrap(), Opened::Existing(_)), "{backend}");
        assert!(
            matches!(store.current_context("d", "/api/v1/approvals/a1/context/stream").await.unwrap(), Some(r) if r.context_id == record.context_id),
            "{backend}"
        );
        // no-cache: a new fetch replaces it.
        let Opened::Started(fresh) = store.open_context(context_request(true), 7).await.unwrap() else {
            panic!("{backend}: a refresh starts a fetch");
        };
        assert_ne!(fresh.context_id, record.context_id, "{backend}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refetch_cut_otherwise_and_an_oversized_context_fail_the_fetch() {
    let test = "a_refetch_cut_otherwise_and_an_oversized_context_fail_the_fetch";
    each_backend(test, |store, backend| async move {
        store.ensure_daemon("d", 0).await.unwrap();
        let Opened::Started(record) = store.open_context(context_request(false), 0).await.unwrap()
        else {
            panic!("{backend}");
        };
        let id = record.command_id.clone();
        store
            .post_results("d", vec![chunk(&id, 0, b"abc", false)], LIMITS, 1)
            .await
            .unwrap();
        // Chunk 0 again with other bytes: the response was fetched again and cut otherwise.
        let outcomes = store
            .post_results("d", vec![chunk(&id, 0, b"abd", false)], LIMITS, 2)
            .await
            .unwrap();
        assert!(
            matches!(outcomes[0], PostedOutcome::Chunk(ChunkOutcome::Unknown)),
            "{backend}"
        );
        let failed = store.context(record.context_id).await.unwrap().unwrap();
        assert_eq!(failed.state, ContextState::Failed, "{backend}");
        assert!(
            failed.error_json.unwrap().contains("stream_restarted"),
            "{backend}"
        );
        assert_eq!(
            store.command(&id, 3).await.unwrap().unwrap().state,
            CommandState::Failed,
            "{backend}"
        );

        // A new fetch that grows past max_context_bytes (100).
        let Opened::Started(big) = store.open_context(context_request(false), 4).await.unwrap()
        else {
            panic!("{backend}: a failed context is fetched again");
        };
        let id = big.command_id.clone();
        let outcomes = store
            .post_results(
                "d",
                vec![
                    chunk(&id, 0, &[b'x'; 60], false),
                    chunk(&id, 1, &[b'y'; 60], false),
                ],
                LIMITS,
                5,
            )
            .await
            .unwrap();
        assert!(
            matches!(outcomes[0], PostedOutcome::Chunk(ChunkOutcome::Stored(_))),
            "{backend}"
        );
        assert!(
            matches!(outcomes[1], PostedOutcome::Chunk(ChunkOutcome::TooLarge(_))),
            "{backend}"
        );
        let record = store.context(big.context_id).await.unwrap().unwrap();
        assert_eq!(
            (record.state, record.chunks),
            (ContextState::Failed, 1),
            "{backend}"
        );
        assert!(
            record.error_json.unwrap().contains("payload_too_large"),
            "{backend}"
        );
    })
    .await;
}

fn key(id: &str, role: Role, daemon: Option<&str>) -> KeyRecord {
    KeyRecord {
        key_id: id.into(),
        role,
        daemon_id: daemon.map(str::to_owned),
        scope: match role {
            Role::Client => vec!["d".into(), "*".into()],
            _ => vec![],
        },
        label: Some(format!("{id}'s label")),
        secret_sha256: [7; 32],
        created_at_ms: 42,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_cached_responses_round_trip() {
    let test = "keys_and_cached_responses_round_trip";
    each_backend(test, |store, backend| async move {
        assert!(!store.has_keys().await.unwrap(), "{backend}");
        store
            .create_key(key("k2", Role::Client, None), 0)
            .await
            .unwrap();
        store
            .create_key(key("k1", Role::Daemon, Some("d")), 0)
            .await
            .unwrap();
        assert!(store.has_keys().await.unwrap(), "{backend}");
        assert!(
            store.daemon("d").await.unwrap().is_some(),
            "{backend}: a daemon key's daemon exists"
        );
        let listed: Vec<String> = store
            .keys()
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.key_id)
            .collect();
        assert_eq!(listed, ["k1", "k2"], "{backend}");
        let client = store.key("k2").await.unwrap().unwrap();
        assert_eq!(
            (client.role, client.scope.len(), client.created_at_ms),
            (Role::Client, 2, 42),
            "{backend}"
        );
        assert_eq!(client.secret_sha256, [7; 32], "{backend}");
        assert!(store.remove_key("k2").await.unwrap(), "{backend}");
        assert!(!store.remove_key("k2").await.unwrap(), "{backend}");
        assert!(store.key("k2").await.unwrap().is_none(), "{backend}");

        let copy = CachedResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"[1]".to_vec(),
            stored_at_ms: 10_000,
        };
        assert!(
            store
                .cache_response("d", "/sessions", copy.clone())
                .await
                .unwrap(),
            "{backend}"
        );
        // The same copy a moment later is not written again.
        let same = CachedResponse {
            stored_at_ms: 10_500,
            ..copy.clone()
        };
        assert!(
            !store.cache_response("d", "/sessions", same).await.unwrap(),
            "{backend}"
        );
        let stored = store.response("d", "/sessions").await.unwrap().unwrap();
        assert_eq!(
            (stored.status, stored.body.as_slice(), stored.stored_at_ms),
            (200, &b"[1]"[..], 10_000),
            "{backend}"
        );
        assert_eq!(stored.headers, copy.headers, "{backend}");
        assert!(
            store.response("d", "/other").await.unwrap().is_none(),
            "{backend}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_the_change_log_and_purges_old_results() {
    let test = "retention_trims_the_change_log_and_purges_old_results";
    each_backend(test, |store, backend| async move {
        store.ensure_daemon("d", 0).await.unwrap();
        let updates = (1..=10).map(|n| change("e", Some(n), None)).collect();
        store.append_changes("d", updates, 0).await.unwrap();
        let done = store
            .enqueue(command("d", None, 10), 0)
            .await
            .unwrap()
            .command;
        store.lease("d", None, 10, 100, 0).await.unwrap();
        store
            .post_results("d", vec![result(&done.id, "1")], LIMITS, 0)
            .await
            .unwrap();
        let waiting = store
            .enqueue(command("d", None, 10), 0)
            .await
            .unwrap()
            .command;
        let work = Maintenance {
            retention: RetentionPolicy {
                changes_max_entries: 4,
                changes_max_age_ms: 1_000_000,
                results_max_age_ms: 500,
                responses_max_age_ms: 1_000_000,
            },
            context_ttl_ms: 1_000_000,
            contexts_max_bytes: 1 << 30,
            context_garbage_grace_ms: 1_000,
            census_interval: Duration::from_secs(60),
        };
        let (stats, usage) = store
            .maintain(work, 1_000)
            .await
            .unwrap()
            .expect("not locked");
        assert_eq!(stats.changes_removed, 6, "{backend}");
        assert_eq!(stats.commands_purged, 1, "{backend}");
        assert_eq!(
            stats.commands_expired, 1,
            "{backend}: the waiting one passed its TTL"
        );
        let left: Vec<u64> = store
            .changes_page("d", 0, 100, usize::MAX)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, [7, 8, 9, 10], "{backend}");
        assert!(
            store.command(&done.id, 1_000).await.unwrap().is_none(),
            "{backend}"
        );
        assert_eq!(
            store
                .command(&waiting.id, 1_000)
                .await
                .unwrap()
                .unwrap()
                .state,
            CommandState::Expired,
            "{backend}"
        );
        assert_eq!(usage.commands["expired"], 1, "{backend}");
        assert!(usage.daemon_bytes["d"] > 0, "{backend}");
    })
    .await;
}
