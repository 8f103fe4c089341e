//! The webhook processor example: deduplication, durable queueing, retries with backoff,
//! dead letters after 6 retries.

#[path = "../examples/webhooks.rs"]
#[allow(dead_code)]
mod webhooks;

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};
use webhooks::{Endpoint, WebhookProcessor};

fn runtime() -> TestRuntime {
    TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(SystemTime::now()))
            .agent::<WebhookProcessor>()
            .agent::<Endpoint>(),
    )
    .unwrap()
}

#[tokio::test]
async fn events_are_delivered_once_after_retries() {
    let rt = runtime();
    rt.agent::<Endpoint>("downstream")
        .fail_first(3)
        .await
        .unwrap();
    let hooks = rt.agent::<WebhookProcessor>("in");
    for id in ["a", "b", "a", "c", "b"] {
        hooks.receive(id.into(), "{}".into()).await.unwrap();
    }
    rt.advance(Duration::ZERO).await; // first attempts: all refused
    assert!(hooks.delivered().await.unwrap().is_empty());
    for _ in 0..14 {
        rt.advance(Duration::from_secs(1)).await; // retries at +2, +6 (+4), +14 (+8) s
    }
    assert_eq!(hooks.delivered().await.unwrap(), ["a", "b", "c"]);
    let endpoint = rt.agent::<Endpoint>("downstream");
    for id in ["a", "b", "c"] {
        assert_eq!(
            endpoint.attempts(id.into()).await.unwrap(),
            4,
            "{id}: 3 refusals, then delivered once"
        );
    }
    assert!(hooks.dead_letters().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_event_that_never_gets_through_becomes_a_dead_letter() {
    let rt = runtime();
    rt.agent::<Endpoint>("downstream")
        .fail_first(100)
        .await
        .unwrap();
    let hooks = rt.agent::<WebhookProcessor>("in");
    hooks.receive("doomed".into(), "{}".into()).await.unwrap();
    for _ in 0..200 {
        rt.advance(Duration::from_secs(1)).await;
    }
    let dead = hooks.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1, 7, "1 attempt + 6 retries");
    assert!(
        dead[0].2.contains("downstream answered 503 for doomed"),
        "{dead:?}"
    );
    assert_eq!(
        rt.agent::<Endpoint>("downstream")
            .attempts("doomed".into())
            .await
            .unwrap(),
        7
    );
}
