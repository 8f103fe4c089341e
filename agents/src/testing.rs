//! Helpers for tests: a runtime on a temporary data dir that can be restarted and whose agents
//! can be hibernated on demand.

use std::{ops::Deref, path::Path};

use tempfile::TempDir;

use crate::{
    error::Error,
    runtime::{Builder, Runtime},
};

#[cfg(feature = "cluster")]
mod postgres;
#[cfg(feature = "cluster")]
pub use postgres::TestDatabase;

/// An in-process runtime on a fresh temporary data dir (deleted on drop).
///
/// ```
/// # use agents::prelude::*;
/// # #[derive(Default)] struct Counter;
/// # impl Agent for Counter {}
/// # #[agent] impl Counter { #[callable] async fn ping(&mut self, _ctx: &mut Ctx<Self>) -> u8 { 1 } }
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use agents::testing::TestRuntime;
/// let mut rt = TestRuntime::start(Runtime::builder().agent::<Counter>())?;
/// assert_eq!(rt.agent::<Counter>("a").ping().await?, 1);
/// rt.hibernate::<Counter>("a").await?;
/// rt.restart().await?;
/// # Ok(()) }
/// ```
pub struct TestRuntime {
    runtime: Option<Runtime>,
    builder: Builder,
    dir: TempDir,
}

impl TestRuntime {
    /// Builds `builder` on a new temporary data dir (any `data_dir` it has is replaced).
    pub fn start(builder: Builder) -> Result<Self, Error> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let runtime = builder.clone().data_dir(dir.path()).build()?;
        Ok(TestRuntime {
            runtime: Some(runtime),
            builder,
            dir,
        })
    }

    /// Shuts the runtime down (every agent commits and closes its database) and builds a new
    /// one on the same data dir: memory is gone, storage is not.
    pub async fn restart(&mut self) -> Result<(), Error> {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown().await;
        }
        self.runtime = Some(self.builder.clone().data_dir(self.dir.path()).build()?);
        Ok(())
    }

    /// Shuts the runtime down and keeps the data dir: until [`restart`](TestRuntime::restart),
    /// no runtime serves it (for a tool that needs it to itself, say). Using the runtime
    /// meanwhile panics.
    pub async fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown().await;
        }
    }

    /// Shuts the runtime down and builds `builder` on the same data dir: a deploy of new code
    /// (changed types, new agents) over the data the old code wrote. Later
    /// [`restart`](TestRuntime::restart)s use `builder`.
    pub async fn redeploy(&mut self, builder: Builder) -> Result<(), Error> {
        self.builder = builder;
        self.restart().await
    }

    /// Moves the runtime's manual clock (see [`Builder::clock`]) forward by `by` and runs every
    /// schedule that became due, waiting until their outcomes are durable.
    pub async fn advance(&self, by: std::time::Duration) {
        self.runtime().advance(by).await;
    }

    /// The runtime.
    pub fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .expect("the TestRuntime was stopped: restart it first")
    }

    /// The temporary data dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Deref for TestRuntime {
    type Target = Runtime;

    fn deref(&self) -> &Runtime {
        self.runtime()
    }
}
