//! A handler's panic, caught and turned into an `internal` error (the agent is then re-created
//! from storage on its next event).

use std::{any::Any, future::Future, panic::AssertUnwindSafe};

use futures_util::FutureExt;

use crate::error::Failure;

/// Runs a handler, turning a panic into [`Failure::Panic`].
pub(super) async fn catch_panic<T>(
    handler: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    AssertUnwindSafe(handler)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| Err(Failure::panic(&panic_message(&*panic))))
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}
