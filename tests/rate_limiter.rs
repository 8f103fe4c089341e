//! The rate limiter example: concurrent requests never overspend a bucket.

#[path = "../examples/rate_limiter.rs"]
#[allow(dead_code)]
mod rate_limiter;

use agents::{prelude::*, testing::TestRuntime};
use rate_limiter::{RateLimiter, CAPACITY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_gets_exactly_the_bucket() {
    let rt = TestRuntime::start(Runtime::builder().agent::<RateLimiter>()).unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let limiter = rt.agent::<RateLimiter>(if i % 2 == 0 { "even" } else { "odd" });
            tokio::spawn(async move { limiter.acquire(1).await.unwrap() })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += u32::from(t.await.unwrap().allowed);
    }
    // Each key has its own bucket. Refill over the test's few milliseconds is at most a token or two.
    let bucket = CAPACITY as u32;
    assert!(
        (2 * bucket..=2 * bucket + 2).contains(&allowed),
        "allowed {allowed}"
    );
    let refused = rt.agent::<RateLimiter>("even").acquire(5).await.unwrap();
    assert!(
        !refused.allowed && refused.retry_after_ms > 0,
        "{refused:?}"
    );
}
