//! Time as the runtime sees it: the system clock, or a manual one that tests move forward.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// The source of every schedule time. [`Clock::system`] in production; [`Clock::manual`] in
/// tests, where [`TestRuntime::advance`](crate::testing::TestRuntime::advance) moves it and
/// fires what became due, so a test of a daily cron does not wait a day.
#[derive(Clone)]
pub struct Clock(Arc<Source>);

enum Source {
    System,
    Manual(AtomicU64),
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Clock(Arc::new(Source::System))
    }

    /// A clock that stands still at `start` until it is moved.
    pub fn manual(start: SystemTime) -> Self {
        Clock(Arc::new(Source::Manual(AtomicU64::new(to_ms(start)))))
    }

    /// Whether this is a manual clock.
    pub fn is_manual(&self) -> bool {
        matches!(*self.0, Source::Manual(_))
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        from_ms(self.now_ms())
    }

    /// The current time in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &*self.0 {
            Source::System => to_ms(SystemTime::now()),
            Source::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward; returns the new time. A system clock is not moved.
    pub fn advance(&self, by: Duration) -> SystemTime {
        if let Source::Manual(ms) = &*self.0 {
            ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        }
        self.now()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            Source::System => f.write_str("Clock::system"),
            Source::Manual(_) => write!(f, "Clock::manual({}ms)", self.now_ms()),
        }
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub(crate) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
