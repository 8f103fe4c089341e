//! Cluster mode, in process: two runtimes (two nodes, two data dirs) on one real PostgreSQL
//! database. An agent lives on one node at a time; when its node stops it moves, with
//! everything it acknowledged, to the other, also past a checkpoint (whose snapshot bounds the
//! log); a node that lost an agent while it wrote acknowledges nothing of what it wrote, and its
//! copy is dropped.

mod common;

use agents::{
    prelude::*,
    testing::{TestDatabase, TestRuntime},
    ClusterOptions, ErrorKind,
};
use serde_json::json;

#[derive(Default)]
pub struct Ledger;

impl Agent for Ledger {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&[
            "CREATE TABLE entries(id INTEGER PRIMARY KEY, amount INTEGER NOT NULL, memo BLOB)",
        ])?;
        Ok(())
    }
}

#[agent]
impl Ledger {
    /// Records `amount` (with a memo of `memo_bytes` bytes); returns the balance.
    #[callable]
    pub async fn add(
        &mut self,
        ctx: &mut Ctx<Self>,
        amount: i64,
        memo_bytes: u32,
    ) -> Result<i64, AppError> {
        ctx.sql().execute(
            "INSERT INTO entries(amount, memo) VALUES (?1, zeroblob(?2))",
            (amount, memo_bytes),
        )?;
        self.balance(ctx).await
    }

    #[callable]
    pub async fn balance(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT coalesce(sum(amount), 0) FROM entries", [], |r| {
                r.get(0)
            })?)
    }

    /// Destroys the ledger.
    #[callable]
    pub async fn close_books(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.destroy()?;
        Ok(())
    }

    #[callable]
    pub async fn entries(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT count(*) FROM entries", [], |r| r.get(0))?)
    }
}

fn node(db: &TestDatabase, advertise: &str) -> TestRuntime {
    let options = ClusterOptions::new(&db.url, advertise);
    TestRuntime::start(Runtime::builder().cluster(options).agent::<Ledger>()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moves_with_everything_it_acknowledged() {
    let db = TestDatabase::new().await;
    let mut one = node(&db, "127.0.0.1:1");
    let mut two = node(&db, "127.0.0.1:2");

    let bob = one.agent::<Ledger>("bob");
    assert_eq!(bob.add(5, 0).await.unwrap(), 5);
    assert_eq!(bob.add(10, 0).await.unwrap(), 15);
    // One node at a time: the other is told where it lives.
    let elsewhere = two.agent::<Ledger>("bob").add(1, 0).await.unwrap_err();
    assert_eq!(elsewhere.kind(), ErrorKind::Overloaded, "{elsewhere}");
    assert!(elsewhere.to_string().contains("127.0.0.1:1"), "{elsewhere}");
    // Past a checkpoint (8 MiB of WAL): the file goes to PostgreSQL as a snapshot.
    for _ in 0..45 {
        bob.add(1, 200_000).await.unwrap();
    }
    assert_eq!(bob.balance().await.unwrap(), 60);
    let stored = db
        .client()
        .await
        .query_one(
            "SELECT (SELECT seq FROM agents_snapshots WHERE name = 'bob'),
                    (SELECT count(*) FROM agents_log WHERE name = 'bob')",
            &[],
        )
        .await
        .unwrap();
    let (snapshot, logged): (i64, i64) = (stored.get(0), stored.get(1));
    assert!(
        snapshot > 0,
        "a snapshot past the first batches: {snapshot}"
    );
    assert!(
        snapshot + logged == 47,
        "the log holds what came after it: {snapshot} + {logged}"
    );

    // Its node stops: the other takes it, with everything.
    one.stop().await;
    let moved = two.agent::<Ledger>("bob");
    assert_eq!(moved.balance().await.unwrap(), 60);
    assert_eq!(moved.entries().await.unwrap(), 47);
    assert_eq!(moved.add(100, 0).await.unwrap(), 160);

    // And back to a node whose data dir holds an older copy: it is rebuilt, not reused.
    two.stop().await;
    one.restart().await.unwrap();
    let back = one.agent::<Ledger>("bob");
    assert_eq!(back.add(1000, 0).await.unwrap(), 1160);
    assert_eq!(back.entries().await.unwrap(), 49);
    one.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_an_agent_acknowledges_nothing_it_wrote() {
    let db = TestDatabase::new().await;
    let options = ClusterOptions::new(&db.url, "127.0.0.1:1");
    let (one, addr) = common::serve(Runtime::builder().cluster(options).agent::<Ledger>()).await;
    let two = node(&db, "127.0.0.1:2");
    let on_one = one.agent::<Ledger>("ann");
    let mut socket = common::ws_connect(addr, "/agents/ledger/ann", Some("agents.v1.json"))
        .await
        .unwrap();
    // A call over the socket: its reply comes after the connection's own batch is durable
    // (a batch still in flight at the takeover would be the one refused).
    assert_eq!(common::next_json(&mut socket).await["type"], "identity");
    let add = json!({"type": "call", "id": 1, "method": "add", "args": [5, 0]});
    common::send_json(&mut socket, add).await;
    let reply = common::next_json(&mut socket).await;
    assert_eq!(reply["ok"], 5, "{reply}");

    // Node one is, to the others, dead (as if paused past its lease): two takes ann.
    db.execute("UPDATE agents_nodes SET lease_until = now() - interval '1 second' WHERE addr = '127.0.0.1:1'")
        .await;
    let on_two = two.agent::<Ledger>("ann");
    assert_eq!(on_two.add(7, 0).await.unwrap(), 12);

    // One still has ann live: its write is refused by the fence, and it is not acknowledged.
    let refused = on_one.add(1000, 0).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Overloaded, "{refused}");
    assert!(refused.to_string().contains("moved"), "{refused}");
    assert_eq!(
        on_two.balance().await.unwrap(),
        12,
        "only the new owner's history"
    );
    // Its copy is dropped, its sockets are closed with 1012 (clients reconnect); asked again,
    // it names the owner.
    let again = on_one.balance().await.unwrap_err();
    assert!(again.to_string().contains("127.0.0.1:2"), "{again}");
    let closed = common::next_close(&mut socket)
        .await
        .expect("a close frame");
    assert_eq!(u16::from(closed.code), 1012, "{closed:?}");
    assert_eq!(on_two.add(1, 0).await.unwrap(), 13);
}

/// How many rows of `name` PostgreSQL holds: owner, log, snapshot.
async fn stored(db: &TestDatabase, name: &str) -> i64 {
    let sql = "SELECT (SELECT count(*) FROM agents_owners WHERE name = $1)
                    + (SELECT count(*) FROM agents_log WHERE name = $1)
                    + (SELECT count(*) FROM agents_snapshots WHERE name = $1)";
    db.client()
        .await
        .query_one(sql, &[&name])
        .await
        .unwrap()
        .get(0)
}

/// `stored`, once it is `expected` (or after 2 s): an agent's files and log go once its reply
/// has left (before its next event runs).
async fn stored_soon(db: &TestDatabase, name: &str, expected: i64) -> i64 {
    for _ in 0..100 {
        if stored(db, name).await == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stored(db, name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_agent_and_junk_leave_nothing_in_postgresql() {
    let db = TestDatabase::new().await;
    let (mut one, two) = (node(&db, "127.0.0.1:1"), node(&db, "127.0.0.1:2"));
    let cat = one.agent::<Ledger>("cat");
    assert_eq!(cat.add(5, 0).await.unwrap(), 5);
    assert!(stored(&db, "cat").await >= 3);
    cat.close_books().await.unwrap();
    assert_eq!(stored_soon(&db, "cat", 0).await, 0);
    // It does not come back, on its node or another.
    assert_eq!(cat.balance().await.unwrap(), 0);
    one.stop().await;
    assert_eq!(two.agent::<Ledger>("cat").entries().await.unwrap(), 0);

    // A call that fails on a new name leaves no owner behind.
    let args = agents::client::Payload::Json(serde_json::json!([]));
    let refused = two.runtime().call("ledger", "junk", "nope", args).await;
    assert_eq!(refused.unwrap_err().kind, ErrorKind::UnknownMethod);
    assert_eq!(stored_soon(&db, "junk", 0).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_postgresql_dropped_are_made_again() {
    let db = TestDatabase::new().await;
    let one = node(&db, "127.0.0.1:1");
    let dan = one.agent::<Ledger>("dan");
    assert_eq!(dan.add(5, 0).await.unwrap(), 5);
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // A live agent's appends (the shipper's connection), and a new agent's take.
    assert_eq!(dan.add(1, 0).await.unwrap(), 6);
    assert_eq!(one.agent::<Ledger>("eve").add(2, 0).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_stays_gone_and_bad_options_are_refused() {
    let db = TestDatabase::new().await;
    let short =
        ClusterOptions::new(&db.url, "127.0.0.1:1").lease(std::time::Duration::from_millis(600));
    let mut one = TestRuntime::start(Runtime::builder().cluster(short).agent::<Ledger>()).unwrap();
    // A handle that outlives the runtime's shutdown (the node with it).
    let kept = one.runtime().clone();
    assert_eq!(one.agent::<Ledger>("fay").add(1, 0).await.unwrap(), 1);
    one.stop().await;
    // Past a few renewal intervals: the stopped node has not registered again.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let two = node(&db, "127.0.0.1:2");
    assert_eq!(two.agent::<Ledger>("fay").add(1, 0).await.unwrap(), 2);
    drop(kept);

    for (options, says) in [
        (
            ClusterOptions::new("host=127.0.0.1 port=x", "a:1"),
            "connection string",
        ),
        (ClusterOptions::new(&db.url, ""), "no address"),
        (
            ClusterOptions::new(&db.url, "a:1").lease(std::time::Duration::ZERO),
            "too short",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let built = Runtime::builder()
            .data_dir(dir.path())
            .cluster(options)
            .agent::<Ledger>()
            .build();
        let e = built.unwrap_err();
        assert!(
            matches!(e, agents::Error::Config(_)) && e.to_string().contains(says),
            "{e}"
        );
    }
}
