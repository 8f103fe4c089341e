//! Every event is a transaction; a reply is released only after its writes are committed.

mod common;

use agents::{testing::TestRuntime, Payload, RpcError, Runtime};
use common::{Counter, CounterError};
use serde_json::json;

fn runtime() -> TestRuntime {
    // What is committed is read by another connection while the agent is live.
    TestRuntime::start(
        Runtime::builder()
            .readable_while_live(true)
            .agent::<Counter>(),
    )
    .unwrap()
}

#[tokio::test]
async fn an_err_leaves_no_trace_and_reaches_the_caller_typed() {
    let rt = runtime();
    let c = rt.agent::<Counter>("a");
    assert_eq!(c.add(2).await.unwrap(), 2);
    let err = c.add_then_fail(5).await.unwrap_err();
    assert_eq!(
        err,
        RpcError::App(CounterError::Refused("not adding 5".into()))
    );
    assert_eq!(c.get().await.unwrap(), 2);
    // The kv write of the failed call is gone too.
    let path = rt.database_path::<Counter>("a").unwrap();
    let conn = rusqlite::Connection::open(path).unwrap();
    let kv_rows: i64 = conn
        .query_row("SELECT count(*) FROM _agents_kv", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kv_rows, 0);
}

#[tokio::test]
async fn a_panic_leaves_no_trace_and_the_agent_is_recreated() {
    let rt = runtime();
    let c = rt.agent::<Counter>("p");
    assert_eq!(c.add(1).await.unwrap(), 1);
    assert_eq!(c.starts().await.unwrap(), 1);
    let err = c.add_then_panic(100).await.unwrap_err();
    assert!(
        matches!(&err, RpcError::Internal(m)
            if m.contains("the handler panicked") && m.contains("(ref ") && !m.contains("boom")),
        "the caller learns that it panicked and where to look, not the panic's message: {err:?}"
    );
    assert_eq!(
        c.get().await.unwrap(),
        1,
        "the panicking call's write was rolled back"
    );
    assert_eq!(
        c.starts().await.unwrap(),
        1,
        "a fresh instance ran on_start once"
    );
    assert_eq!(c.add(1).await.unwrap(), 2);
    // Other agents never noticed.
    assert_eq!(rt.agent::<Counter>("other").add(7).await.unwrap(), 7);
}

#[tokio::test]
async fn every_acknowledged_write_is_committed_before_the_reply() {
    let rt = runtime();
    let c = rt.agent::<Counter>("gate");
    let path = rt.database_path::<Counter>("gate").unwrap();
    c.add(0).await.unwrap();
    // An independent connection sees only committed data.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { c.add(1).await.unwrap() }));
    }
    for t in tasks {
        let acked = t.await.unwrap();
        let committed: i64 = conn
            .query_row("SELECT n FROM counter", [], |r| r.get(0))
            .unwrap();
        assert!(
            committed >= acked,
            "reply {acked} released before its commit (saw {committed})"
        );
    }
}

#[tokio::test]
async fn untyped_calls_answer_unknown_methods_and_bad_arguments_clearly() {
    let rt = runtime();
    let ok = rt
        .call("counter", "j", "add", Payload::Json(json!([4])))
        .await
        .unwrap();
    assert_eq!(ok, Payload::Json(json!(4)));
    let e = rt
        .call("counter", "j", "nope", Payload::Json(json!([])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, agents::ErrorKind::UnknownMethod);
    assert!(e.message.contains("nope"));
    let e = rt
        .call("counter", "j", "add", Payload::Json(json!(["four"])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, agents::ErrorKind::BadArgs, "{e}");
    assert!(e.message.contains("add"), "{e}");
    let e = rt
        .call("counter", "j", "add", Payload::Json(json!([1, 2])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, agents::ErrorKind::BadArgs, "{e}");
    let e = rt
        .call("counter", "j", "get", Payload::Json(json!([1])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, agents::ErrorKind::BadArgs, "{e}");
    let e = rt
        .call("counter", "j", "add", Payload::Postcard(vec![0xff; 12]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, agents::ErrorKind::BadArgs, "{e}");
    let e = rt
        .call("no-such-class", "j", "add", Payload::Json(json!([1])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, agents::ErrorKind::BadArgs, "{e}");
    // A typed application error travels as JSON data too.
    let e = rt
        .call("counter", "j", "add_then_fail", Payload::Json(json!([1])))
        .await
        .unwrap_err();
    assert_eq!(e.kind, agents::ErrorKind::App);
    assert_eq!(
        e.data,
        Some(Payload::Json(json!({"Refused": "not adding 1"})))
    );
    // None of it hurt the agent.
    assert_eq!(rt.agent::<Counter>("j").get().await.unwrap(), 4);
}

#[tokio::test]
async fn a_call_past_its_deadline_times_out_and_a_dropped_call_never_runs() {
    let rt = runtime();
    let c = rt.agent::<Counter>("t");
    let slow = c.clone().with_timeout(std::time::Duration::from_millis(50));
    assert_eq!(slow.sleep_ms(500).await.unwrap_err(), RpcError::Timeout);
    // Queue a call behind a slow one, then drop it: it must not run.
    let busy = tokio::spawn({
        let c = c.clone();
        async move { c.sleep_ms(300).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let dropped = tokio::time::timeout(std::time::Duration::from_millis(50), c.add(1000)).await;
    assert!(dropped.is_err(), "the add was queued behind the sleeper");
    busy.await.unwrap().unwrap();
    assert_eq!(c.get().await.unwrap(), 0, "the dropped call did not run");
    // A timeout too long to count is no timeout (not an overflow).
    let patient = c.clone().with_timeout(std::time::Duration::MAX);
    assert_eq!(patient.add(2).await.unwrap(), 2);
}

/// Runs whatever SQL it is given: lets a test end the runtime's transaction from a handler.
/// It tells its caller SQLite's error as it is (`AppError::msg`), which `?` alone would not.
#[derive(Default)]
pub struct Rogue;
impl agents::Agent for Rogue {}

use agents::AppError;

#[agents::agent]
impl Rogue {
    #[callable]
    pub async fn exec(
        &mut self,
        ctx: &mut agents::Ctx<Self>,
        sql: String,
    ) -> Result<(), agents::AppError> {
        ctx.sql().execute_batch(&sql).map_err(AppError::msg)
    }

    #[callable]
    pub async fn count(&mut self, ctx: &mut agents::Ctx<Self>) -> Result<i64, agents::AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_cannot_end_the_transaction_and_a_rollback_by_sqlite_fails_the_whole_batch() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Rogue>()).unwrap();
    let r = rt.agent::<Rogue>("r");
    r.exec("CREATE TABLE t(x PRIMARY KEY)".into())
        .await
        .unwrap();
    for sql in [
        "INSERT INTO t VALUES (1); COMMIT",
        "ROLLBACK",
        "END",
        "BEGIN",
        "RELEASE agents_event",
        "ROLLBACK TO agents_event",
    ] {
        let err = r.exec(sql.into()).await.unwrap_err();
        assert!(
            matches!(&err, RpcError::App(e) if e.message.contains("not authorized")),
            "{sql}: {err}"
        );
    }
    // The handler's own savepoints are fine.
    r.exec("SAVEPOINT mine; INSERT INTO t VALUES (2); RELEASE mine".into())
        .await
        .unwrap();
    assert_eq!(
        r.count().await.unwrap(),
        1,
        "the INSERT before the refused COMMIT was rolled back"
    );

    // `OR ROLLBACK` makes SQLite abort the whole batch transaction: every call that shared it
    // must fail, none may report success for a write that is gone.
    let mut calls = Vec::new();
    for i in 10..40 {
        let r = r.clone();
        calls.push(tokio::spawn(async move {
            r.exec(format!("INSERT INTO t VALUES ({i})")).await
        }));
    }
    let bad = tokio::spawn({
        let r = r.clone();
        async move { r.exec("INSERT OR ROLLBACK INTO t VALUES (2)".into()).await }
    });
    let mut acked = 0;
    for c in calls {
        acked += i64::from(c.await.unwrap().is_ok());
    }
    assert!(bad.await.unwrap().is_err());
    eprintln!("{acked} of 30 calls acknowledged next to the rolled-back one");
    rt.hibernate::<Rogue>("r").await.unwrap();
    assert_eq!(
        r.count().await.unwrap(),
        1 + acked,
        "exactly the acknowledged rows are stored"
    );
}
