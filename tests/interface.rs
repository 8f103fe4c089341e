//! `#[agents::interface]`: an agent's API declared as a trait in a client-only crate
//! (`examples/counter-api`, which depends on neither rusqlite nor axum), implemented by an agent
//! with `#[agent] impl CounterApi for Counter`, called in-process and over the network with the
//! same generated client.

mod common;

use agents::prelude::*;
use counter_api::{Changed, CounterApi, CounterApiClient, CounterError};

#[derive(Default)]
pub struct Counter;

impl Agent for Counter {}

#[agent(class = "api-counter")]
impl CounterApi for Counter {
    async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, CounterError> {
        let n = ctx.kv().get::<i64>("n").ok().flatten().unwrap_or(0);
        if n + by < 0 {
            return Err(CounterError::BelowZero(n));
        }
        ctx.kv().put("n", &(n + by)).expect("stored");
        ctx.broadcast(&Changed::To(n + by), &[]).expect("sent");
        Ok(n + by)
    }

    async fn get(&mut self, ctx: &mut Ctx<Self>) -> i64 {
        ctx.kv().get::<i64>("n").ok().flatten().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interface_client_calls_the_agent_in_process_and_over_the_network() {
    let (rt, addr) = common::serve(Runtime::builder().agent::<Counter>()).await;
    // In-process: the runtime's client for the agent is the interface's client.
    let local: CounterApiClient = rt.agent::<Counter>("c");
    assert_eq!(local.add(5).await, Ok(5));
    assert_eq!(
        local.add(-9).await,
        Err(RpcError::App(CounterError::BelowZero(5)))
    );
    // Over the network, from a crate that knows only the interface.
    let remote = CounterApiClient::connect(&format!("ws://{addr}/agents/api-counter/c"))
        .await
        .unwrap();
    let mut events = remote.events();
    assert_eq!(remote.add(2).await, Ok(7));
    assert_eq!(remote.get().await, Ok(7));
    assert_eq!(events.next().await.unwrap().unwrap(), Changed::To(7));
    // The method list comes from the trait.
    let names: Vec<_> = <Counter as agents::AgentClass>::METHODS
        .iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["add", "get"]);
}

#[test]
fn the_client_only_crate_needs_neither_sqlite_nor_the_server() {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "counter-api",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(tree.contains("agents-client"), "{tree}");
    for forbidden in ["rusqlite", "libsqlite3", "axum", "hyper ", "agents v"] {
        assert!(
            !tree.contains(forbidden),
            "counter-api depends on {forbidden}:\n{tree}"
        );
    }
}
