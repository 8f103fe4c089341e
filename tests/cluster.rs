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
    let (one, two) = (node(&db, "127.0.0.1:1"), node(&db, "127.0.0.1:2"));
    let on_one = one.agent::<Ledger>("ann");
    assert_eq!(on_one.add(5, 0).await.unwrap(), 5);

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
    // Its copy is dropped; asked again, it names the owner.
    let again = on_one.balance().await.unwrap_err();
    assert!(again.to_string().contains("127.0.0.1:2"), "{again}");
    assert_eq!(on_two.add(1, 0).await.unwrap(), 13);
}
