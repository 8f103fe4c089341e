//! Locking a mutex whose holder panicked: no code holds these locks across a panic point that
//! leaves the data half-changed, so the data is taken as it is.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, recovering the data if a holder panicked.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
