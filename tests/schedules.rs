//! Schedules on one alarm, driven by a manual clock: one-shot, cron (time zones, DST), interval,
//! cancel, list, static schedules, backoff, dead letters, the alarm, catch-up.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime},
};

use agents::{prelude::*, testing::TestRuntime, AlarmInfo, Clock, ScheduleKind, When};

/// Every attempt of every scheduled run, with the clock's time: a failing run's own writes are
/// rolled back, so attempts are recorded outside the database.
static ATTEMPTS: Mutex<Vec<(String, String, u64)>> = Mutex::new(Vec::new());

fn attempts(agent: &str, what: &str) -> Vec<u64> {
    ATTEMPTS
        .lock()
        .unwrap()
        .iter()
        .filter(|(a, w, _)| a == agent && w == what)
        .map(|(_, _, t)| *t)
        .collect()
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn at(rfc3339: &str) -> SystemTime {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_millis(t.timestamp_millis() as u64)
}

#[derive(Default)]
pub struct Jobs;

impl Agent for Jobs {
    async fn on_alarm(&mut self, ctx: &mut Ctx<Self>, info: AlarmInfo) -> Result<(), AppError> {
        record(
            ctx,
            if info.is_retry {
                "alarm-retry"
            } else {
                "alarm"
            },
        );
        if ctx.kv().get::<bool>("alarm-fails")?.unwrap_or(false) {
            return Err(AppError::msg("alarm failed"));
        }
        Ok(())
    }
}

fn record(ctx: &Ctx<Jobs>, what: &str) {
    ATTEMPTS
        .lock()
        .unwrap()
        .push((ctx.name().to_owned(), what.to_owned(), ms(ctx.now())));
}

#[agent]
impl Jobs {
    #[callable]
    pub async fn log(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<(), AppError> {
        record(ctx, &text);
        ctx.sql()
            .execute_batch("CREATE TABLE IF NOT EXISTS log(text)")?;
        ctx.sql().execute("INSERT INTO log VALUES (?1)", [&text])?;
        Ok(())
    }

    #[callable]
    pub async fn fail(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<(), AppError> {
        record(ctx, &text);
        ctx.sql().execute_batch(
            "CREATE TABLE IF NOT EXISTS log(text); INSERT INTO log VALUES ('never')",
        )?;
        Err(AppError::msg(format!("{text} failed")))
    }

    #[callable]
    pub async fn panic(&mut self, ctx: &mut Ctx<Self>, text: String) {
        record(ctx, &text);
        panic!("{text} panicked");
    }

    /// Schedules `log` (or `fail`, or `panic`, as `run` says) with `text`, `secs` from now.
    #[callable]
    pub async fn after(
        &mut self,
        ctx: &mut Ctx<Self>,
        secs: u64,
        run: String,
        text: String,
    ) -> Result<i64, AppError> {
        let call = match run.as_str() {
            "log" => Jobs::calls().log(text),
            "fail" => Jobs::calls().fail(text),
            _ => Jobs::calls().panic(text),
        };
        Ok(ctx.schedule(When::after(Duration::from_secs(secs)), call)?)
    }

    #[callable]
    pub async fn keyed_after(
        &mut self,
        ctx: &mut Ctx<Self>,
        key: String,
        secs: u64,
        text: String,
    ) -> Result<i64, AppError> {
        Ok(ctx.schedule_keyed(
            &key,
            When::after(Duration::from_secs(secs)),
            Jobs::calls().log(text),
        )?)
    }

    #[callable]
    pub async fn cron(
        &mut self,
        ctx: &mut Ctx<Self>,
        expr: String,
        tz: Option<String>,
        text: String,
    ) -> Result<i64, AppError> {
        let when = match tz {
            Some(tz) => When::cron_in(&expr, &tz)?,
            None => When::cron(&expr)?,
        };
        Ok(ctx.schedule(when, Jobs::calls().log(text))?)
    }

    #[callable]
    pub async fn every(
        &mut self,
        ctx: &mut Ctx<Self>,
        secs: u64,
        text: String,
    ) -> Result<i64, AppError> {
        Ok(ctx.schedule(
            When::every(Duration::from_secs(secs)),
            Jobs::calls().log(text),
        )?)
    }

    #[callable]
    pub async fn enqueue(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<i64, AppError> {
        Ok(ctx.enqueue(Jobs::calls().log(text))?)
    }

    #[callable]
    pub async fn cancel(&mut self, ctx: &mut Ctx<Self>, id: i64) -> Result<bool, AppError> {
        Ok(ctx.cancel(id)?)
    }

    /// (id, method, next time in ms, attempts, kind)
    #[callable]
    pub async fn list(
        &mut self,
        ctx: &mut Ctx<Self>,
    ) -> Result<Vec<(i64, String, u64, u32, String)>, AppError> {
        Ok(ctx
            .schedules()?
            .into_iter()
            .map(|s| {
                (
                    s.id,
                    s.method,
                    ms(s.next),
                    s.attempts,
                    format!("{:?}", s.kind),
                )
            })
            .collect())
    }

    /// (id, method, attempts, error)
    #[callable]
    pub async fn dead(
        &mut self,
        ctx: &mut Ctx<Self>,
    ) -> Result<Vec<(i64, String, u32, String)>, AppError> {
        Ok(ctx
            .dead_letters()?
            .into_iter()
            .map(|d| (d.id, d.method, d.attempts, d.error))
            .collect())
    }

    #[callable]
    pub async fn retry_dead(
        &mut self,
        ctx: &mut Ctx<Self>,
        id: i64,
    ) -> Result<Option<i64>, AppError> {
        Ok(ctx.retry_dead_letter(id)?)
    }

    #[callable]
    pub async fn discard_dead(&mut self, ctx: &mut Ctx<Self>, id: i64) -> Result<bool, AppError> {
        Ok(ctx.discard_dead_letter(id)?)
    }

    #[callable]
    pub async fn delete_alarm(&mut self, ctx: &mut Ctx<Self>) -> Result<bool, AppError> {
        Ok(ctx.delete_alarm()?)
    }

    #[callable]
    pub async fn set_alarm_in(
        &mut self,
        ctx: &mut Ctx<Self>,
        secs: u64,
        fail: bool,
    ) -> Result<(), AppError> {
        ctx.kv().put("alarm-fails", &fail)?;
        Ok(ctx.set_alarm(ctx.now() + Duration::from_secs(secs))?)
    }

    #[callable]
    pub async fn alarm(&mut self, ctx: &mut Ctx<Self>) -> Result<Option<u64>, AppError> {
        Ok(ctx.alarm()?.map(ms))
    }

    #[callable]
    pub async fn logged(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<String>, AppError> {
        ctx.sql()
            .execute_batch("CREATE TABLE IF NOT EXISTS log(text)")?;
        let mut stmt = ctx.sql().prepare("SELECT text FROM log ORDER BY rowid")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    #[schedule(every = "1h")]
    async fn hourly(&mut self, ctx: &mut Ctx<Self>) {
        record(ctx, "hourly");
    }
}

const START: &str = "2026-03-27T12:00:00Z";

fn runtime() -> TestRuntime {
    TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(at(START)))
            .agent::<Jobs>(),
    )
    .unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[tokio::test]
async fn a_one_shot_runs_once_at_its_time_even_when_hibernated() {
    let rt = runtime();
    let j = rt.agent::<Jobs>("one-shot");
    j.after(10, "log".into(), "ten".into()).await.unwrap();
    rt.hibernate::<Jobs>("one-shot").await.unwrap();
    rt.advance(secs(9)).await;
    assert!(attempts("one-shot", "ten").is_empty());
    assert!(!rt.is_live::<Jobs>("one-shot"), "nothing woke it early");
    rt.advance(secs(1)).await;
    assert_eq!(attempts("one-shot", "ten"), [ms(at(START)) + 10_000]);
    rt.advance(secs(3600)).await;
    assert_eq!(attempts("one-shot", "ten").len(), 1);
    assert_eq!(j.logged().await.unwrap(), ["ten"]);
    assert!(
        j.list().await.unwrap().iter().all(|row| row.1 != "log"),
        "the one-shot is gone"
    );
}

#[tokio::test]
async fn cron_in_a_time_zone_keeps_local_time_across_daylight_saving() {
    let rt = runtime();
    let j = rt.agent::<Jobs>("paris");
    j.cron(
        "0 9 * * *".into(),
        Some("Europe/Paris".into()),
        "nine".into(),
    )
    .await
    .unwrap();
    j.cron("0 9 * * *".into(), None, "nine-utc".into())
        .await
        .unwrap();
    for _ in 0..(3 * 24) {
        rt.advance(secs(3600)).await;
    }
    // Paris switched to summer time on 2026-03-29: 09:00 local is 08:00 UTC before, 07:00 after.
    let expected: Vec<u64> = [
        "2026-03-28T08:00:00Z",
        "2026-03-29T07:00:00Z",
        "2026-03-30T07:00:00Z",
    ]
    .into_iter()
    .map(|t| ms(at(t)))
    .collect();
    assert_eq!(attempts("paris", "nine"), expected);
    let utc: Vec<u64> = [
        "2026-03-28T09:00:00Z",
        "2026-03-29T09:00:00Z",
        "2026-03-30T09:00:00Z",
    ]
    .into_iter()
    .map(|t| ms(at(t)))
    .collect();
    assert_eq!(attempts("paris", "nine-utc"), utc);
}

#[tokio::test]
async fn intervals_collapse_missed_runs_and_keep_their_phase() {
    let rt = runtime();
    let j = rt.agent::<Jobs>("interval");
    j.every(10, "tick".into()).await.unwrap();
    let start = ms(at(START));
    rt.advance(secs(10)).await;
    rt.advance(secs(35)).await; // three periods missed: one catch-up run
    assert_eq!(
        attempts("interval", "tick"),
        [start + 10_000, start + 45_000]
    );
    let next = j
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.1 == "log")
        .unwrap()
        .2;
    assert_eq!(
        next,
        start + 50_000,
        "counted from the scheduled time, not from the late run"
    );
}

#[tokio::test]
async fn schedules_can_be_listed_cancelled_and_keyed() {
    let rt = runtime();
    let j = rt.agent::<Jobs>("cancel");
    let a = j.after(5, "log".into(), "a".into()).await.unwrap();
    let b = j.after(6, "log".into(), "b".into()).await.unwrap();
    let k1 = j
        .keyed_after("daily-report".into(), 7, "k".into())
        .await
        .unwrap();
    let k2 = j
        .keyed_after("daily-report".into(), 9, "k".into())
        .await
        .unwrap();
    assert_eq!(k1, k2, "the same key keeps the same row");
    let listed: Vec<i64> = j
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.1 == "log")
        .map(|r| r.0)
        .collect();
    assert_eq!(listed, [a, b, k1]);
    assert!(j.cancel(a).await.unwrap());
    assert!(!j.cancel(a).await.unwrap());
    rt.advance(secs(10)).await;
    assert_eq!(j.logged().await.unwrap(), ["b", "k"]);
    let err = j
        .cron("61 * * * *".into(), None, "x".into())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("invalid cron expression `61 * * * *`"),
        "{err}"
    );
}

#[tokio::test]
async fn enqueued_calls_run_soon_without_the_clock_moving() {
    let rt = runtime();
    let j = rt.agent::<Jobs>("queue");
    for i in 0..3 {
        j.enqueue(format!("job-{i}")).await.unwrap();
    }
    // No `advance`: "as soon as possible" does not wait for the manual clock.
    let mut logged = Vec::new();
    for _ in 0..2_000 {
        logged = j.logged().await.unwrap();
        if logged.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(logged, ["job-0", "job-1", "job-2"]);
    assert!(j.list().await.unwrap().iter().all(|row| row.1 != "log"));
}

#[tokio::test]
async fn failures_back_off_two_four_eight_seconds_then_become_dead_letters() {
    let rt = runtime();
    let j = rt.agent::<Jobs>("backoff");
    j.after(0, "fail".into(), "flaky".into()).await.unwrap();
    j.after(0, "panic".into(), "crashy".into()).await.unwrap();
    j.every(60, "healthy".into()).await.unwrap();
    // Due now: they run without the clock moving (and this waits until they did).
    rt.advance(Duration::ZERO).await;
    for _ in 0..300 {
        rt.advance(secs(1)).await;
    }
    let start = ms(at(START));
    for what in ["flaky", "crashy"] {
        let times = attempts("backoff", what);
        assert_eq!(times.len(), 7, "{what}: 1 + 6 attempts: {times:?}");
        let gaps: Vec<u64> = times.windows(2).map(|w| (w[1] - w[0]) / 1000).collect();
        assert_eq!(gaps, [2, 4, 8, 16, 32, 64], "{what}");
        assert_eq!(times[0], start);
    }
    assert_eq!(
        attempts("backoff", "healthy").len(),
        5,
        "a failing row never blocks a healthy one"
    );
    let dead = j.dead().await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|d| d.1 == "fail" || d.1 == "panic"));
    assert!(dead.iter().all(|d| d.2 == 7), "{dead:?}");
    assert!(
        dead.iter().any(|d| d.3.contains("flaky failed")),
        "{dead:?}"
    );
    assert!(
        dead.iter().any(|d| d.3.contains("crashy panicked")),
        "{dead:?}"
    );
    assert_eq!(
        j.logged()
            .await
            .unwrap()
            .iter()
            .filter(|t| *t == "never")
            .count(),
        0,
        "failed runs wrote nothing"
    );

    // A dead letter can be put back on the schedule.
    let flaky = dead.iter().find(|d| d.1 == "fail").unwrap().0;
    assert!(j.retry_dead(flaky).await.unwrap().is_some());
    rt.advance(secs(1)).await;
    assert_eq!(attempts("backoff", "flaky").len(), 8);
    let remaining = j.dead().await.unwrap();
    assert_eq!(remaining.len(), 1);
    assert!(j.discard_dead(remaining[0].0).await.unwrap());
    assert!(!j.discard_dead(remaining[0].0).await.unwrap());
    assert!(j.dead().await.unwrap().is_empty());
    rt.advance(secs(300)).await;
    assert_eq!(
        attempts("backoff", "crashy").len(),
        7,
        "a discarded dead letter never runs again"
    );
}

#[tokio::test]
async fn a_later_set_alarm_replaces_the_earlier_one_and_failed_alarms_retry() {
    let rt = runtime();
    let j = rt.agent::<Jobs>("alarm");
    j.set_alarm_in(10, false).await.unwrap();
    j.set_alarm_in(20, false).await.unwrap();
    let start = ms(at(START));
    assert_eq!(j.alarm().await.unwrap(), Some(start + 20_000));
    rt.advance(secs(15)).await;
    assert!(attempts("alarm", "alarm").is_empty());
    rt.advance(secs(5)).await;
    assert_eq!(attempts("alarm", "alarm"), [start + 20_000]);
    assert_eq!(
        j.alarm().await.unwrap(),
        None,
        "a successful alarm is cleared"
    );

    // A deleted alarm does not go off.
    j.set_alarm_in(5, false).await.unwrap();
    assert!(j.delete_alarm().await.unwrap());
    assert!(!j.delete_alarm().await.unwrap());
    rt.advance(secs(10)).await;
    assert_eq!(attempts("alarm", "alarm").len(), 1);

    j.set_alarm_in(1, true).await.unwrap();
    for _ in 0..5 {
        rt.advance(secs(1)).await;
    }
    assert_eq!(attempts("alarm", "alarm").len(), 2);
    assert_eq!(
        attempts("alarm", "alarm-retry").len(),
        1,
        "retried 2 s after failing"
    );
}

#[tokio::test]
async fn a_new_agent_whose_first_calls_failed_still_gets_its_static_schedules() {
    let rt = runtime();
    let name = "failed-first";
    // Every event of the first batch fails: the agent's new files go (junk leaves nothing)...
    let failed = rt.agent::<Jobs>(name).fail("first".into()).await;
    assert!(failed.is_err());
    // ...and the next call starts it afresh in new ones, `#[schedule]` rows included, while
    // the same instance stays live.
    let rows = rt.agent::<Jobs>(name).list().await.unwrap();
    assert!(rt.is_live::<Jobs>(name));
    assert_eq!(
        rows.iter().filter(|r| r.1 == "hourly").count(),
        1,
        "{rows:?}"
    );
    rt.advance(secs(3600)).await;
    assert_eq!(attempts(name, "hourly").len(), 1);
}

#[tokio::test]
async fn static_schedules_are_registered_once_and_survive_restarts() {
    let mut rt = runtime();
    let name = "static";
    rt.agent::<Jobs>(name).logged().await.unwrap();
    for _ in 0..3 {
        rt.hibernate::<Jobs>(name).await.unwrap();
        rt.agent::<Jobs>(name).logged().await.unwrap();
        rt.restart().await.unwrap();
        rt.agent::<Jobs>(name).logged().await.unwrap();
    }
    let rows = rt.agent::<Jobs>(name).list().await.unwrap();
    let hourly: Vec<_> = rows.iter().filter(|r| r.1 == "hourly").collect();
    assert_eq!(hourly.len(), 1, "{rows:?}");
    assert_eq!(
        hourly[0].4,
        format!("{:?}", ScheduleKind::Every(secs(3600)))
    );
    rt.advance(secs(3600)).await;
    assert_eq!(attempts(name, "hourly").len(), 1);
    // Scheduled methods are not reachable by clients.
    let e = rt
        .call(
            "jobs",
            name,
            "hourly",
            agents::Payload::Json(serde_json::json!([])),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, agents::ErrorKind::UnknownMethod);
}

#[tokio::test]
async fn overdue_schedules_fire_after_a_restart_from_the_index_alone() {
    let mut rt = runtime();
    let j = rt.agent::<Jobs>("downtime");
    j.after(10, "log".into(), "during-downtime".into())
        .await
        .unwrap();
    rt.restart().await.unwrap();
    assert_eq!(rt.pending_alarms(), 1, "the index remembers the agent");
    assert!(!rt.is_live::<Jobs>("downtime"));
    rt.advance(secs(60)).await;
    assert_eq!(attempts("downtime", "during-downtime").len(), 1);
}
