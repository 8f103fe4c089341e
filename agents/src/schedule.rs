//! Schedules: rows in the agent's own `_agents_schedules` table, from which its one alarm is
//! derived. One-shot (`When::after`, `When::at`), recurring (`When::cron`, `When::every`),
//! queued (`ctx.enqueue`), and the agent's own alarm (`ctx.set_alarm`), which is one more row.
//!
//! When rows are due, each runs as its own event in its own savepoint. Success deletes a
//! one-shot and moves a recurring row to its next time after *now*, counted from its scheduled
//! time (missed runs after downtime collapse into one). Failure (an `Err` or a panic) keeps the
//! row, counts the attempt, and retries it after 2 s, 4 s, 8 s .. ([`RETRIES`] times); then the
//! row moves to the dead letters, never silently dropped.

use std::{
    str::FromStr,
    time::{Duration, SystemTime},
};

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{
    address::AgentKey,
    clock::{from_ms, to_ms},
    error::Error,
    storage::Stored,
};

/// How many times a failed row is retried before it becomes a dead letter.
pub const RETRIES: u32 = 6;
/// The first retry delay; each further retry doubles it.
pub const RETRY_BASE: Duration = Duration::from_secs(2);

const ALARM_KEY: &str = "__alarm";
const STATIC_PREFIX: &str = "static:";

/// When a scheduled call should run.
#[derive(Clone, Debug)]
pub struct When(Spec);

#[derive(Clone, Debug)]
enum Spec {
    After(Duration),
    At(SystemTime),
    Every(Duration),
    Cron {
        expr: String,
        tz: Option<chrono_tz::Tz>,
    },
}

impl When {
    /// As soon as possible (what [`Ctx::enqueue`](crate::Ctx::enqueue) uses).
    pub fn now() -> Self {
        When(Spec::After(Duration::ZERO))
    }

    /// Once, `delay` from now.
    pub fn after(delay: Duration) -> Self {
        When(Spec::After(delay))
    }

    /// Once, at `time` (a time in the past runs as soon as possible).
    pub fn at(time: SystemTime) -> Self {
        When(Spec::At(time))
    }

    /// Every `period`, the first time one period from now. Runs never overlap: the next time is
    /// counted from the scheduled one, skipping periods that already passed.
    pub fn every(period: Duration) -> Self {
        When(Spec::Every(period))
    }

    /// On a cron schedule, in UTC: `"*/5 * * * *"`, `"0 9 * * MON-FRI"`, or with a leading
    /// seconds field. An invalid expression is refused with the parser's message.
    pub fn cron(expr: &str) -> Result<Self, Error> {
        parse_cron(expr)?;
        Ok(When(Spec::Cron {
            expr: expr.to_owned(),
            tz: None,
        }))
    }

    /// On a cron schedule read in the IANA time zone `tz` (`"Europe/Paris"`): `"0 9 * * *"` is
    /// 09:00 local time on both sides of a daylight-saving change.
    pub fn cron_in(expr: &str, tz: &str) -> Result<Self, Error> {
        parse_cron(expr)?;
        Ok(When(Spec::Cron {
            expr: expr.to_owned(),
            tz: Some(parse_tz(tz)?),
        }))
    }
}

impl When {
    /// When a schedule made of this at `now` would first be due: what to show a user ("next
    /// run: .."). A zero period, or a cron expression that never occurs after `now`, is refused.
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// use agents::When;
    /// let noon = UNIX_EPOCH + Duration::from_secs(12 * 3600);
    /// let nine = When::cron("0 9 * * *")?.first_due(noon)?;
    /// assert_eq!(nine, UNIX_EPOCH + Duration::from_secs(33 * 3600)); // 09:00 the next day
    /// # Ok::<(), agents::Error>(())
    /// ```
    pub fn first_due(&self, now: SystemTime) -> Result<SystemTime, Error> {
        let first = timing(self, to_ms(now))?.first;
        Ok(std::time::UNIX_EPOCH + Duration::from_millis(first))
    }
}

fn parse_cron(expr: &str) -> Result<Cron, Error> {
    let invalid = |why: &dyn std::fmt::Display| {
        Error::Schedule(format!("invalid cron expression `{expr}`: {why}"))
    };
    let cron = Cron::from_str(expr).map_err(|e| invalid(&e))?;
    if let Some(field) = empty_field(&cron) {
        return Err(invalid(&format_args!("its {field} field lists no value")));
    }
    Ok(cron)
}

/// Every field from seconds to day of week lists at least one value (or `L`, `W`, `#`): one that
/// lists none (`","`, which the parser lets through) matches no time at all, and the search for
/// a time that never comes runs to the parser's limit, a minute of CPU for an empty seconds
/// field. (An empty year list is searched year by year, refused by `first_due` in ~0.1 ms; to
/// check it here would double the cost of every parse, its 5,000 years read one by one.)
fn empty_field(cron: &Cron) -> Option<&'static str> {
    let p = &cron.pattern;
    [
        ("seconds", &p.seconds),
        ("minutes", &p.minutes),
        ("hours", &p.hours),
        ("day-of-month", &p.days),
        ("month", &p.months),
        ("day-of-week", &p.days_of_week),
    ]
    .into_iter()
    .find(|(_, field)| field.values().is_empty() && !field.has_modifiers())
    .map(|(name, _)| name)
}

fn parse_tz(tz: &str) -> Result<chrono_tz::Tz, Error> {
    tz.parse()
        .map_err(|e| Error::Schedule(format!("unknown time zone `{tz}`: {e}")))
}

/// The first occurrence of `expr` strictly after `after_ms`.
fn cron_next(expr: &str, tz: Option<chrono_tz::Tz>, after_ms: u64) -> Result<u64, Error> {
    let cron = parse_cron(expr)?;
    let utc: DateTime<Utc> = Utc
        .timestamp_millis_opt(after_ms as i64)
        .single()
        .unwrap_or_default();
    let next = match tz {
        Some(tz) => cron
            .find_next_occurrence(&utc.with_timezone(&tz), false)
            .map(|t| t.timestamp_millis()),
        None => cron
            .find_next_occurrence(&utc, false)
            .map(|t| t.timestamp_millis()),
    };
    next.map(|ms| ms.max(0) as u64)
        .map_err(|e| Error::Schedule(format!("cron `{expr}` has no next occurrence: {e}")))
}

/// What kind of row a schedule is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Runs once.
    Once,
    /// Runs every period.
    Every(Duration),
    /// Runs on a cron schedule, in UTC or the named time zone.
    Cron {
        /// The expression.
        expr: String,
        /// The IANA time zone, if not UTC.
        tz: Option<String>,
    },
    /// The agent's alarm: runs `on_alarm`.
    Alarm,
}

/// One row of the agent's schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Its id, for [`Ctx::cancel`](crate::Ctx::cancel).
    pub id: i64,
    /// The idempotency key it was created with (`static:<method>` for `#[schedule]` methods).
    pub key: Option<String>,
    /// The callable it runs.
    pub method: String,
    /// One-shot, recurring, or the alarm.
    pub kind: ScheduleKind,
    /// When it runs next.
    pub next: SystemTime,
    /// Failed attempts since its last success.
    pub attempts: u32,
    /// When it was created.
    pub created: SystemTime,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// The agent the call goes to (`None`: this one); see
    /// [`Ctx::enqueue_to`](crate::Ctx::enqueue_to).
    pub target: Option<AgentKey>,
}

/// A row that failed `1 + RETRIES` times in a row and was taken off the schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id, for [`Ctx::retry_dead_letter`](crate::Ctx::retry_dead_letter) and
    /// [`Ctx::discard_dead_letter`](crate::Ctx::discard_dead_letter).
    pub id: i64,
    /// The callable it ran.
    pub method: String,
    /// What kind of row it was.
    pub kind: ScheduleKind,
    /// How many attempts failed.
    pub attempts: u32,
    /// The last error.
    pub error: String,
    /// When the last attempt failed.
    pub failed: SystemTime,
    /// When the row was created.
    pub created: SystemTime,
    /// The agent the call went to (`None`: this one).
    pub target: Option<AgentKey>,
}

/// What `on_alarm` is told about the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlarmInfo {
    /// How many earlier attempts of this alarm failed.
    pub retry_count: u32,
    /// Whether this is a retry (`retry_count > 0`).
    pub is_retry: bool,
    /// When the alarm was set to go off.
    pub scheduled: SystemTime,
}

/// A `#[schedule(..)]` method, as `#[agent]` records it.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct StaticSchedule {
    pub method: &'static str,
    pub cron: Option<&'static str>,
    pub tz: Option<&'static str>,
    pub every_ms: Option<u64>,
}

impl StaticSchedule {
    /// The schedule as a `When`, or why it is invalid.
    pub(crate) fn when(&self) -> Result<When, Error> {
        let what = |e: Error| Error::Schedule(format!("#[schedule] on `{}`: {e}", self.method));
        match (self.cron, self.tz, self.every_ms) {
            (Some(c), None, None) => When::cron(c).map_err(what),
            (Some(c), Some(tz), None) => When::cron_in(c, tz).map_err(what),
            (None, None, Some(ms)) if ms > 0 => Ok(When::every(Duration::from_millis(ms))),
            _ => Err(Error::Schedule(format!(
                "#[schedule] on `{}` needs exactly one of cron / every",
                self.method
            ))),
        }
    }
}

/// A row's `target_class` and `target_name` name the agent its call goes to (`NULL`: this one).
pub(crate) const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS _agents_schedules(
        id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE, method TEXT NOT NULL, args BLOB NOT NULL,
        kind TEXT NOT NULL, spec TEXT, tz TEXT, next_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL, last_error TEXT, target_class TEXT, target_name TEXT);
    CREATE INDEX IF NOT EXISTS _agents_schedules_next ON _agents_schedules(next_ms);
    CREATE TABLE IF NOT EXISTS _agents_dead_letters(
        id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, method TEXT NOT NULL, args BLOB NOT NULL,
        kind TEXT NOT NULL, spec TEXT, tz TEXT, attempts INTEGER NOT NULL, error TEXT NOT NULL,
        failed_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL, target_class TEXT, target_name TEXT);";

/// The agent a row's call goes to, from its two columns.
fn target(class: Option<String>, name: Option<String>) -> Option<AgentKey> {
    AgentKey::new(&class?, &name?).ok()
}

/// The stored form of a `When`.
struct Timing {
    kind: &'static str,
    spec: Option<String>,
    tz: Option<String>,
    /// The first time it is due.
    first: u64,
}

fn timing(when: &When, now: u64) -> Result<Timing, Error> {
    let once = |first| Timing {
        kind: "once",
        spec: None,
        tz: None,
        first,
    };
    Ok(match &when.0 {
        Spec::After(d) => once(now.saturating_add(d.as_millis() as u64)),
        Spec::At(t) => once(to_ms(*t)),
        Spec::Every(d) if d.is_zero() => {
            return Err(Error::Schedule(
                "When::every needs a period above zero".into(),
            ))
        }
        Spec::Every(d) => {
            let ms = d.as_millis() as u64;
            Timing {
                kind: "every",
                spec: Some(ms.to_string()),
                tz: None,
                first: now.saturating_add(ms),
            }
        }
        Spec::Cron { expr, tz } => Timing {
            kind: "cron",
            spec: Some(expr.clone()),
            tz: tz.map(|t| t.name().to_owned()),
            first: cron_next(expr, *tz, now)?,
        },
    })
}

fn kind_of(kind: &str, spec: Option<String>, tz: Option<String>) -> ScheduleKind {
    match kind {
        "every" => ScheduleKind::Every(Duration::from_millis(
            spec.and_then(|s| s.parse().ok()).unwrap_or(0),
        )),
        "cron" => ScheduleKind::Cron {
            expr: spec.unwrap_or_default(),
            tz,
        },
        "alarm" => ScheduleKind::Alarm,
        _ => ScheduleKind::Once,
    }
}

/// Adds a row, calling `method` of `target` (this agent if `None`); with a `key` that already
/// exists, keeps the existing row and returns its id.
#[allow(clippy::too_many_arguments)] // the columns of a row
pub(crate) fn insert(
    conn: &Connection,
    key: Option<&str>,
    target: Option<&AgentKey>,
    method: &str,
    args: &Stored,
    when: &When,
    now: u64,
) -> Result<i64, Error> {
    let Timing {
        kind,
        spec,
        tz,
        first,
    } = timing(when, now)?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO _agents_schedules(key, method, args, kind, spec, tz, next_ms, created_ms, target_class, target_name)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT(key) DO NOTHING RETURNING id",
        )?
        .query_row(
            params![
                key,
                method,
                args,
                kind,
                spec,
                tz,
                first as i64,
                now as i64,
                target.map(AgentKey::class),
                target.map(AgentKey::name)
            ],
            |r| r.get(0),
        )
        .optional()?;
    match (inserted, key) {
        (Some(id), _) => Ok(id),
        (None, Some(key)) => Ok(conn.query_row(
            "SELECT id FROM _agents_schedules WHERE key = ?1",
            [key],
            |r| r.get(0),
        )?),
        (None, None) => Err(Error::Schedule("the schedule row was not inserted".into())),
    }
}

/// Sets the alarm (replacing the previous one).
pub(crate) fn set_alarm(conn: &Connection, at: u64, now: u64) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO _agents_schedules(key, method, args, kind, next_ms, created_ms) VALUES (?1, '', x'', 'alarm', ?2, ?3)
         ON CONFLICT(key) DO UPDATE SET next_ms = excluded.next_ms, attempts = 0, last_error = NULL",
    )?
    .execute(params![ALARM_KEY, at as i64, now as i64])?;
    Ok(())
}

pub(crate) fn alarm(conn: &Connection) -> Result<Option<u64>, Error> {
    Ok(conn
        .prepare_cached("SELECT next_ms FROM _agents_schedules WHERE key = ?1")?
        .query_row([ALARM_KEY], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|ms| ms as u64))
}

pub(crate) fn delete_alarm(conn: &Connection) -> Result<bool, Error> {
    Ok(conn
        .prepare_cached("DELETE FROM _agents_schedules WHERE key = ?1")?
        .execute([ALARM_KEY])?
        > 0)
}

fn schedule_row(r: &Row<'_>) -> rusqlite::Result<Schedule> {
    Ok(Schedule {
        id: r.get(0)?,
        key: r.get(1)?,
        method: r.get(2)?,
        kind: kind_of(&r.get::<_, String>(3)?, r.get(4)?, r.get(5)?),
        next: from_ms(r.get::<_, i64>(6)? as u64),
        attempts: r.get(7)?,
        created: from_ms(r.get::<_, i64>(8)? as u64),
        last_error: r.get(9)?,
        target: target(r.get(10)?, r.get(11)?),
    })
}

/// Every row but the alarm, by next time.
pub(crate) fn list(conn: &Connection) -> Result<Vec<Schedule>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, key, method, kind, spec, tz, next_ms, attempts, created_ms, last_error, target_class, target_name
         FROM _agents_schedules WHERE kind != 'alarm' ORDER BY next_ms, id",
    )?;
    let rows = stmt
        .query_map([], schedule_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Removes the row `id` (not the alarm); `true` if it existed.
pub(crate) fn cancel(conn: &Connection, id: i64) -> Result<bool, Error> {
    Ok(conn
        .prepare_cached("DELETE FROM _agents_schedules WHERE id = ?1 AND kind != 'alarm'")?
        .execute([id])?
        > 0)
}

/// The earliest next time: what the agent's alarm is.
pub(crate) fn earliest(conn: &Connection) -> Result<Option<u64>, Error> {
    Ok(conn
        .prepare_cached("SELECT min(next_ms) FROM _agents_schedules")?
        .query_row([], |r| r.get::<_, Option<i64>>(0))?
        .map(|ms| ms.max(0) as u64))
}

/// A row that is due.
#[derive(Debug)]
pub(crate) struct Due {
    pub id: i64,
    pub method: String,
    pub args: Stored,
    kind: String,
    spec: Option<String>,
    tz: Option<String>,
    pub next_ms: u64,
    pub attempts: u32,
    /// The agent the call goes to (`None`: this one).
    pub target: Option<AgentKey>,
}

impl Due {
    pub fn is_alarm(&self) -> bool {
        self.kind == "alarm"
    }

    /// Runs once: a one-shot row or the alarm.
    pub fn is_one_shot(&self) -> bool {
        self.kind == "once" || self.kind == "alarm"
    }
}

/// The rows due at `now`, in due order.
pub(crate) fn due(conn: &Connection, now: u64, limit: usize) -> Result<Vec<Due>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, method, args, kind, spec, tz, next_ms, attempts, target_class, target_name
         FROM _agents_schedules WHERE next_ms <= ?1 ORDER BY next_ms, id LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![now as i64, limit as i64], |r| {
            Ok(Due {
                id: r.get(0)?,
                method: r.get(1)?,
                args: r.get(2)?,
                kind: r.get(3)?,
                spec: r.get(4)?,
                tz: r.get(5)?,
                next_ms: r.get::<_, i64>(6)? as u64,
                attempts: r.get(7)?,
                target: target(r.get(8)?, r.get(9)?),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Deletes the row `id`.
pub(crate) fn remove(conn: &Connection, id: i64) -> Result<(), Error> {
    conn.prepare_cached("DELETE FROM _agents_schedules WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// Records a successful run: a one-shot goes, a recurring row moves to its next time after `now`.
pub(crate) fn succeeded(conn: &Connection, row: &Due, now: u64) -> Result<(), Error> {
    let next = match row.kind.as_str() {
        "every" => {
            let period = row
                .spec
                .as_deref()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                .max(1);
            let missed = now.saturating_sub(row.next_ms) / period;
            Some(row.next_ms + (missed + 1) * period)
        }
        "cron" => {
            let tz = row.tz.as_deref().map(parse_tz).transpose()?;
            Some(cron_next(
                row.spec.as_deref().unwrap_or_default(),
                tz,
                now.max(row.next_ms),
            )?)
        }
        _ => None,
    };
    match next {
        Some(next) => conn
            .prepare_cached("UPDATE _agents_schedules SET next_ms = ?2, attempts = 0, last_error = NULL WHERE id = ?1")?
            .execute(params![row.id, next as i64])?,
        None => conn.prepare_cached("DELETE FROM _agents_schedules WHERE id = ?1")?.execute([row.id])?,
    };
    Ok(())
}

/// Records a failed run: retried with backoff, or moved to the dead letters after `RETRIES`.
/// Returns whether it became a dead letter.
pub(crate) fn failed(conn: &Connection, row: &Due, now: u64, error: &str) -> Result<bool, Error> {
    let attempts = row.attempts + 1;
    if attempts > RETRIES {
        conn.prepare_cached(
            "INSERT INTO _agents_dead_letters(key, method, args, kind, spec, tz, attempts, error, failed_ms, created_ms, target_class, target_name)
             SELECT key, method, args, kind, spec, tz, ?2, ?3, ?4, created_ms, target_class, target_name FROM _agents_schedules WHERE id = ?1",
        )?
        .execute(params![row.id, attempts, error, now as i64])?;
        conn.prepare_cached("DELETE FROM _agents_schedules WHERE id = ?1")?
            .execute([row.id])?;
        return Ok(true);
    }
    let delay = RETRY_BASE.as_millis() as u64 * (1 << (attempts - 1));
    conn.prepare_cached(
        "UPDATE _agents_schedules SET next_ms = ?2, attempts = ?3, last_error = ?4 WHERE id = ?1",
    )?
    .execute(params![row.id, (now + delay) as i64, attempts, error])?;
    Ok(false)
}

pub(crate) fn dead_letters(conn: &Connection) -> Result<Vec<DeadLetter>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, method, kind, spec, tz, attempts, error, failed_ms, created_ms, target_class, target_name
         FROM _agents_dead_letters ORDER BY id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(DeadLetter {
                id: r.get(0)?,
                method: r.get(1)?,
                kind: kind_of(&r.get::<_, String>(2)?, r.get(3)?, r.get(4)?),
                attempts: r.get(5)?,
                error: r.get(6)?,
                failed: from_ms(r.get::<_, i64>(7)? as u64),
                created: from_ms(r.get::<_, i64>(8)? as u64),
                target: target(r.get(9)?, r.get(10)?),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Puts a dead letter back on the schedule, due now with a fresh attempt count. Returns the new
/// schedule id, or `None` if there is no such dead letter.
pub(crate) fn retry_dead_letter(
    conn: &Connection,
    id: i64,
    now: u64,
) -> Result<Option<i64>, Error> {
    let new_id = conn
        .prepare_cached(
            "INSERT INTO _agents_schedules(key, method, args, kind, spec, tz, next_ms, created_ms, target_class, target_name)
             SELECT key, method, args, kind, spec, tz, ?2, created_ms, target_class, target_name FROM _agents_dead_letters WHERE id = ?1
             ON CONFLICT(key) DO NOTHING RETURNING id",
        )?
        .query_row(params![id, now as i64], |r| r.get(0))
        .optional()?;
    discard_dead_letter(conn, id)?;
    Ok(new_id)
}

pub(crate) fn discard_dead_letter(conn: &Connection, id: i64) -> Result<bool, Error> {
    Ok(conn
        .prepare_cached("DELETE FROM _agents_dead_letters WHERE id = ?1")?
        .execute([id])?
        > 0)
}

/// Makes the `#[schedule]` rows match `statics`: one row per method (keyed `static:<method>`),
/// replaced when its attribute changed, removed when the method no longer has one.
pub(crate) fn sync_static(
    conn: &Connection,
    statics: &[StaticSchedule],
    now: u64,
) -> Result<(), Error> {
    let mut keep = Vec::new();
    for s in statics {
        let key = format!("{STATIC_PREFIX}{}", s.method);
        let Timing { kind, spec, tz, .. } = timing(&s.when()?, now)?;
        let current: Option<(String, Option<String>, Option<String>)> = conn
            .prepare_cached("SELECT kind, spec, tz FROM _agents_schedules WHERE key = ?1")?
            .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if current != Some((kind.to_owned(), spec, tz)) {
            conn.prepare_cached("DELETE FROM _agents_schedules WHERE key = ?1")?
                .execute([&key])?;
            let no_args = Stored::Json("[]".into());
            insert(conn, Some(&key), None, s.method, &no_args, &s.when()?, now)?;
        }
        keep.push(key);
    }
    let existing: Vec<String> = conn
        .prepare_cached("SELECT key FROM _agents_schedules WHERE key LIKE 'static:%'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for key in existing.into_iter().filter(|k| !keep.contains(k)) {
        conn.prepare_cached("DELETE FROM _agents_schedules WHERE key = ?1")?
            .execute([key])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> u64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn cron_follows_time_zones_across_daylight_saving() {
        // 09:00 in Paris: 08:00 UTC in winter, 07:00 UTC in summer (DST began 2026-03-29).
        let tz = Some(parse_tz("Europe/Paris").unwrap());
        assert_eq!(
            cron_next("0 9 * * *", tz, ms("2026-03-28T12:00:00Z")).unwrap(),
            ms("2026-03-29T07:00:00Z")
        );
        assert_eq!(
            cron_next("0 9 * * *", tz, ms("2026-03-27T12:00:00Z")).unwrap(),
            ms("2026-03-28T08:00:00Z")
        );
        // 02:30 does not exist in Paris on 2026-03-29; the occurrence is not lost to the gap.
        let next = cron_next("30 2 * * *", tz, ms("2026-03-28T12:00:00Z")).unwrap();
        assert!(
            next >= ms("2026-03-29T00:00:00Z") && next <= ms("2026-03-30T01:00:00Z"),
            "{next}"
        );
        assert_eq!(
            cron_next("0 9 * * *", None, ms("2026-03-28T12:00:00Z")).unwrap(),
            ms("2026-03-29T09:00:00Z")
        );
    }

    #[test]
    fn static_rows_follow_their_attributes() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(TABLES).unwrap();
        let every = |ms| StaticSchedule {
            method: "tick",
            cron: None,
            tz: None,
            every_ms: Some(ms),
        };
        let cron = StaticSchedule {
            method: "nightly",
            cron: Some("0 3 * * *"),
            tz: None,
            every_ms: None,
        };
        let rows = |conn: &Connection| {
            list(conn)
                .unwrap()
                .into_iter()
                .map(|s| (s.method, s.kind))
                .collect::<Vec<_>>()
        };
        sync_static(&conn, &[every(1000), cron], 0).unwrap();
        let id = list(&conn).unwrap()[0].id;
        sync_static(&conn, &[every(1000), cron], 500).unwrap();
        assert_eq!(
            list(&conn).unwrap()[0].id,
            id,
            "unchanged: the row (and its next time) is kept"
        );
        assert_eq!(list(&conn).unwrap().len(), 2);
        sync_static(&conn, &[every(2000)], 600).unwrap();
        assert_eq!(
            rows(&conn),
            [(
                "tick".to_string(),
                ScheduleKind::Every(Duration::from_secs(2))
            )]
        );
        assert_eq!(
            list(&conn).unwrap()[0].next,
            from_ms(2600),
            "changed: re-created from now"
        );
        sync_static(&conn, &[], 700).unwrap();
        assert!(rows(&conn).is_empty(), "attribute removed: row removed");
    }

    #[test]
    fn invalid_expressions_and_zones_are_refused_with_the_reason() {
        let e = When::cron("61 * * * *").unwrap_err().to_string();
        assert!(e.contains("invalid cron expression `61 * * * *`"), "{e}");
        assert!(When::cron("every day").is_err());
        // The fuzzer's find: an empty list passes the parser and matches nothing.
        for (expr, field) in [
            (", * * * * *", "seconds"),
            ("0 , * * * *", "minutes"),
            (", *   3\r6  6\r6 ", "seconds"),
            ("0 0 0 * * ,", "day-of-week"),
        ] {
            let e = When::cron(expr).unwrap_err().to_string();
            assert!(
                e.contains(&format!("its {field} field lists no value")),
                "{e}"
            );
        }
        When::cron("0 0 0 L 2 *").expect("L is a value");
        When::cron("0 0 0 * * 5#5").expect("# is a value");
        let e = When::cron_in("0 9 * * *", "Mars/Olympus")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown time zone `Mars/Olympus`"), "{e}");
    }
}
