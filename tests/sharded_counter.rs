//! The sharded counter example: the parent sums its shards through typed calls.

#[path = "../examples/sharded_counter.rs"]
#[allow(dead_code)]
mod sharded_counter;

use agents::{prelude::*, testing::TestRuntime};
use sharded_counter::{shard_name, Shard, ShardedCounter};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_is_the_sum_of_the_shards_even_after_hibernation() {
    let rt = TestRuntime::start(
        Runtime::builder()
            .agent::<Shard>()
            .agent::<ShardedCounter>(),
    )
    .unwrap();
    let tasks: Vec<_> = (0..2_000u64)
        .map(|item| {
            let shard = rt.agent::<Shard>(&shard_name("views", item));
            tokio::spawn(async move { shard.add(2).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let parent = rt.agent::<ShardedCounter>("views");
    assert_eq!(parent.total().await.unwrap(), 4_000);
    rt.hibernate::<Shard>(&shard_name("views", 3))
        .await
        .unwrap();
    assert_eq!(parent.total().await.unwrap(), 4_000);
    assert_eq!(
        rt.agent::<ShardedCounter>("other").total().await.unwrap(),
        0
    );
}
