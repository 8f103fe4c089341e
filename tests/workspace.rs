//! The workspace example: a parent registry of child thread agents, deletion reported to the
//! parent, and the monthly cleanup cron.

#[path = "../examples/workspace.rs"]
#[allow(dead_code)]
mod workspace;

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};
use workspace::{Thread, Workspace};

#[tokio::test]
async fn threads_keep_their_messages_and_the_parent_keeps_the_registry() {
    // 2026-10-31 12:00 UTC: the monthly cleanup runs on 1 November at 03:00.
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_793_448_000);
    let rt = TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(start))
            .agent::<Workspace>()
            .agent::<Thread>(),
    )
    .unwrap();
    let ws = rt.agent::<Workspace>("acme");
    let mut names = Vec::new();
    for title in ["general", "random", "ops"] {
        names.push(ws.create_thread(title.into()).await.unwrap());
    }
    for (i, name) in names.iter().enumerate() {
        for m in 0..=i {
            rt.agent::<Thread>(name)
                .post(format!("m{m}"))
                .await
                .unwrap();
        }
    }
    assert_eq!(
        rt.agent::<Thread>(&names[2]).messages().await.unwrap(),
        ["m0", "m1", "m2"]
    );
    rt.agent::<Thread>(&names[1]).delete().await.unwrap();
    let live: Vec<String> = ws
        .threads()
        .await
        .unwrap()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(live, ["general", "ops"]);
    assert!(rt
        .agent::<Thread>(&names[1])
        .messages()
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        ws.registry_size().await.unwrap(),
        3,
        "deleted threads stay until the cleanup"
    );

    rt.advance(Duration::from_secs(14 * 3600)).await; // 1 November, 02:00
    assert_eq!(ws.registry_size().await.unwrap(), 3);
    rt.advance(Duration::from_secs(3600)).await; // 03:00
    assert_eq!(ws.registry_size().await.unwrap(), 2);
    assert_eq!(
        rt.agent::<Thread>(&names[0]).messages().await.unwrap(),
        ["m0"]
    );
}
