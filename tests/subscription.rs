//! The subscription example: renewal after 30 days, re-armed on success, downgraded after a
//! declined card, cancellable, across restarts.

#[path = "../examples/subscription.rs"]
#[allow(dead_code)]
mod subscription;

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};
use subscription::{Subscription, PERIOD};

fn runtime() -> TestRuntime {
    TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            ))
            .agent::<Subscription>(),
    )
    .unwrap()
}

#[tokio::test]
async fn renewals_rearm_until_a_charge_fails() {
    let mut rt = runtime();
    let s = rt.agent::<Subscription>("alice");
    let first = s.signup().await.unwrap().renews_at.unwrap();
    rt.advance(PERIOD - Duration::from_secs(1)).await;
    assert_eq!(
        s.status().await.unwrap().charges,
        0,
        "not renewed a second early"
    );
    rt.advance(Duration::from_secs(1)).await;
    let st = s.status().await.unwrap();
    assert_eq!((st.plan.as_str(), st.charges), ("pro", 1));
    assert_eq!(
        st.renews_at,
        Some(first + PERIOD),
        "re-armed under the same key for the next period"
    );

    rt.restart().await.unwrap();
    let s = rt.agent::<Subscription>("alice");
    rt.advance(PERIOD).await;
    assert_eq!(
        s.status().await.unwrap().charges,
        2,
        "renewed after a restart"
    );

    s.set_card_valid(false).await.unwrap();
    rt.advance(PERIOD).await;
    let st = s.status().await.unwrap();
    assert_eq!(
        (st.plan.as_str(), st.charges, st.renews_at),
        ("free", 2, None)
    );
    rt.advance(PERIOD * 3).await;
    assert_eq!(
        s.status().await.unwrap().charges,
        2,
        "no renewals after the downgrade"
    );
}

#[tokio::test]
async fn a_cancelled_subscription_never_renews() {
    let rt = runtime();
    let s = rt.agent::<Subscription>("bob");
    s.signup().await.unwrap();
    let st = s.cancel().await.unwrap();
    assert_eq!((st.plan.as_str(), st.renews_at), ("free", None));
    rt.advance(PERIOD * 2).await;
    assert_eq!(s.status().await.unwrap().charges, 0);
}
