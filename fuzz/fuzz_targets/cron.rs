//! A cron expression and a time zone, as a user may write any (in `#[schedule]`, or from a
//! request): refused with an error or accepted, and an accepted one's first time is found or
//! refused, never a panic nor a hang, at any starting time.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use agents::When;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u32, &str, &str)| {
    let (seconds, expr, tz) = input;
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(seconds) * 16);
    let when = match tz {
        "" => When::cron(expr),
        tz => When::cron_in(expr, tz),
    };
    if let Ok(when) = when {
        let _ = when.first_due(now);
    }
});
