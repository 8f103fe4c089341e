//! The one timer of a connection's reader.

use std::{pin::Pin, time::Duration};

use tokio::time::{Instant, Sleep};

/// The one timer of a connection's reader: for its idle limit and for the deadlines of its
/// calls (no timer per call). It may go off early (for a call answered since); it then just
/// sets itself again.
pub(super) struct Timer {
    pub(super) sleep: Pin<Box<Sleep>>,
    pub(super) armed: bool,
    pub(super) idle: Option<Duration>,
    pub(super) last_frame: Instant,
    /// The earliest deadline of a call in flight, as far as the reader knows.
    pub(super) calls_due: Option<Instant>,
}

impl Timer {
    pub(super) fn new(idle: Option<Duration>) -> Self {
        let now = Instant::now();
        let mut timer = Timer {
            sleep: Box::pin(tokio::time::sleep_until(now)),
            armed: false,
            idle,
            last_frame: now,
            calls_due: None,
        };
        timer.arm();
        timer
    }

    /// The connection is not idle now (a frame came). Reads the clock only if there is an idle
    /// limit to keep.
    pub(super) fn active(&mut self) {
        if self.idle.is_some() {
            self.last_frame = Instant::now();
        }
    }

    fn idle_due(&self) -> Option<Instant> {
        self.idle.and_then(|idle| self.last_frame.checked_add(idle))
    }

    pub(super) fn is_idle(&self) -> bool {
        self.idle_due().is_some_and(|due| due <= Instant::now())
    }

    /// Sets the timer for the earlier of the idle limit and the first call's deadline.
    pub(super) fn arm(&mut self) {
        let at = self.idle_due().into_iter().chain(self.calls_due).min();
        self.armed = at.is_some();
        if let Some(at) = at {
            self.sleep.as_mut().reset(at);
        }
    }

    /// A call due by `deadline` is in flight.
    pub(super) fn call_due(&mut self, deadline: Instant) {
        if self.calls_due.is_none_or(|due| deadline < due) {
            self.calls_due = Some(deadline);
            self.arm();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn goes_off_at_the_earliest_of_the_idle_limit_and_the_deadlines() {
        let start = Instant::now();
        let secs = Duration::from_secs;
        let mut timer = Timer::new(Some(secs(10)));
        assert!(timer.armed);
        assert_eq!(timer.sleep.deadline(), start + secs(10));
        timer.call_due(start + secs(3));
        assert_eq!(timer.sleep.deadline(), start + secs(3));
        timer.call_due(start + secs(5)); // later than the one it knows: no change
        assert_eq!(timer.sleep.deadline(), start + secs(3));

        // Without an idle limit it is armed only while a call is due.
        let mut calls_only = Timer::new(None);
        assert!(!calls_only.armed);
        calls_only.call_due(start + secs(1));
        assert!(calls_only.armed);
        assert_eq!(calls_only.sleep.deadline(), start + secs(1));

        // A frame puts the idle limit off.
        tokio::time::advance(secs(11)).await;
        assert!(timer.is_idle());
        timer.active();
        assert!(!timer.is_idle());
        timer.calls_due = None;
        timer.arm();
        assert_eq!(timer.sleep.deadline(), start + secs(21));
    }
}
