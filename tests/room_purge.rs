//! The room example: history is purged after 30 minutes without activity; every post pushes
//! the purge back; hibernation and restarts change nothing.

#[path = "../examples/room.rs"]
#[allow(dead_code)]
mod room;

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};
use room::{Room, IDLE};

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn idle_rooms_are_purged_and_active_ones_are_not() {
    let mut rt = TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(SystemTime::now()))
            .agent::<Room>(),
    )
    .unwrap();
    let lobby = rt.agent::<Room>("lobby");
    let quiet = rt.agent::<Room>("quiet");
    quiet.post("anyone?".into()).await.unwrap();
    for i in 0..4 {
        lobby.post(format!("message {i}")).await.unwrap();
        rt.advance(20 * MINUTE).await; // lobby never idles 30 minutes
    }
    assert_eq!(lobby.history().await.unwrap().len(), 4);
    assert!(
        quiet.history().await.unwrap().is_empty(),
        "purged after 30 quiet minutes"
    );
    assert_eq!(quiet.purge_at().await.unwrap(), None);

    rt.hibernate::<Room>("lobby").await.unwrap();
    rt.restart().await.unwrap();
    let lobby = rt.agent::<Room>("lobby");
    rt.advance(IDLE - 20 * MINUTE - Duration::from_secs(1))
        .await;
    assert_eq!(
        lobby.history().await.unwrap().len(),
        4,
        "not a second early"
    );
    rt.advance(Duration::from_secs(1)).await;
    assert!(lobby.history().await.unwrap().is_empty());
}
