//! Stored data outlives the code that wrote it: values written by one version of an agent read
//! back after a deploy that changed their types as serde allows (a field added with a default,
//! one removed), self-describing types (`serde_json::Value`, tagged enums) are stored and read,
//! and rows written by an older runtime (postcard) still read.

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The first version of the code.
mod v1 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Profile {
        pub name: String,
        pub visits: u32,
        /// Removed in v2.
        pub legacy_flag: bool,
    }

    #[derive(Default)]
    pub struct Account;
    impl Agent for Account {}

    #[agent(class = "account", state = "Profile")]
    impl Account {
        /// Stores `p` in the kv store and as the shared state, and schedules a reminder
        /// carrying it an hour from now.
        #[callable]
        pub async fn save(&mut self, ctx: &mut Ctx<Self>, p: Profile) -> Result<(), AppError> {
            ctx.kv().put("profile", &p)?;
            ctx.set_state(&p)?;
            ctx.schedule(
                When::after(Duration::from_secs(3600)),
                Account::calls().remind(p),
            )?;
            Ok(())
        }

        #[callable]
        pub async fn remind(&mut self, ctx: &mut Ctx<Self>, p: Profile) -> Result<(), AppError> {
            ctx.kv().put("reminded", &p)?;
            Ok(())
        }
    }
}

/// The next version: `legacy_flag` is gone, `email` is new (with a default).
mod v2 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Profile {
        pub name: String,
        pub visits: u32,
        #[serde(default)]
        pub email: Option<String>,
    }

    /// A JS-shaped event: internally tagged.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum Note {
        Saved { by: String },
        Cleared,
    }

    #[derive(Default)]
    pub struct Account;
    impl Agent for Account {}

    #[agent(class = "account", state = "Profile")]
    impl Account {
        /// The profile from the kv store, the shared state, and what the reminder carried.
        #[callable]
        pub async fn load(
            &mut self,
            ctx: &mut Ctx<Self>,
        ) -> Result<(Option<Profile>, Option<Profile>, Option<Profile>), AppError> {
            Ok((
                ctx.kv().get("profile")?,
                ctx.state()?,
                ctx.kv().get("reminded")?,
            ))
        }

        #[callable]
        pub async fn remind(&mut self, ctx: &mut Ctx<Self>, p: Profile) -> Result<(), AppError> {
            ctx.kv().put("reminded", &p)?;
            Ok(())
        }

        /// Stores any JSON and a tagged enum, and reads them back.
        #[callable]
        pub async fn keep(
            &mut self,
            ctx: &mut Ctx<Self>,
            value: serde_json::Value,
            note: Note,
        ) -> Result<(serde_json::Value, Note), AppError> {
            ctx.kv().put("value", &value)?;
            ctx.kv().put("note", &note)?;
            Ok((
                ctx.kv().get("value")?.unwrap_or_default(),
                ctx.kv()
                    .get("note")?
                    .ok_or_else(|| AppError::msg("no note"))?,
            ))
        }

        /// A kv entry as a `u64`.
        #[callable]
        pub async fn number(
            &mut self,
            ctx: &mut Ctx<Self>,
            key: String,
        ) -> Result<Option<u64>, AppError> {
            Ok(ctx.kv().get(&key)?)
        }
    }
}

fn start() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn builder_v1() -> agents::Builder {
    Runtime::builder()
        .clock(Clock::manual(start()))
        .agent::<v1::Account>()
}

fn builder_v2() -> agents::Builder {
    // Its databases are read with SQLite while the agents are live.
    Runtime::builder()
        .readable_while_live(true)
        .clock(Clock::manual(start()))
        .agent::<v2::Account>()
}

#[tokio::test]
async fn values_written_by_v1_read_back_as_v2_after_a_deploy() {
    let mut rt = TestRuntime::start(builder_v1()).unwrap();
    let p = v1::Profile {
        name: "ann".into(),
        visits: 3,
        legacy_flag: true,
    };
    rt.agent::<v1::Account>("ann").save(p).await.unwrap();

    rt.redeploy(builder_v2()).await.unwrap();
    let ann = rt.agent::<v2::Account>("ann");
    let expected = v2::Profile {
        name: "ann".into(),
        visits: 3,
        email: None,
    };
    let (kv, state, reminded) = ann.load().await.unwrap();
    assert_eq!(kv.as_ref(), Some(&expected), "kv");
    assert_eq!(state.as_ref(), Some(&expected), "shared state");
    assert_eq!(reminded, None);
    // The reminder v1 scheduled runs in v2, its stored argument read as v2's type.
    rt.advance(Duration::from_secs(3601)).await;
    assert_eq!(ann.load().await.unwrap().2, Some(expected));
}

#[tokio::test]
async fn self_describing_types_are_stored_and_read_back() {
    let mut rt = TestRuntime::start(builder_v2()).unwrap();
    let value = json!({"nested": [1, "two", {"three": null}], "n": 1.5});
    let note = v2::Note::Saved { by: "ann".into() };
    let a = rt.agent::<v2::Account>("values");
    assert_eq!(
        a.keep(value.clone(), note.clone()).await.unwrap(),
        (value.clone(), note.clone())
    );
    rt.restart().await.unwrap();
    let a = rt.agent::<v2::Account>("values");
    assert_eq!(
        a.keep(value.clone(), v2::Note::Cleared).await.unwrap(),
        (value, v2::Note::Cleared)
    );
    // Readable by people with the sqlite3 shell.
    let db =
        rusqlite::Connection::open(rt.database_path::<v2::Account>("values").unwrap()).unwrap();
    let stored: String = db
        .query_row(
            "SELECT v FROM _agents_kv WHERE k = CAST('note' AS BLOB)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, r#"{"type":"cleared"}"#);
}

#[tokio::test]
async fn rows_an_older_runtime_wrote_in_postcard_still_read() {
    let mut rt = TestRuntime::start(builder_v2()).unwrap();
    let a = rt.agent::<v2::Account>("old");
    assert_eq!(a.number("n".into()).await.unwrap(), None);
    rt.runtime().clone().shutdown().await;
    {
        // What runtime schema 3 wrote: postcard blobs, for a value and for a schedule's
        // arguments.
        let db =
            rusqlite::Connection::open(rt.database_path::<v2::Account>("old").unwrap()).unwrap();
        let n = postcard::to_stdvec(&42u64).unwrap();
        db.execute(
            "INSERT INTO _agents_kv(k, v) VALUES (CAST('n' AS BLOB), ?1)",
            [n],
        )
        .unwrap();
        let old = v2::Profile {
            name: "old".into(),
            visits: 1,
            email: Some("old@example.com".into()),
        };
        let args = postcard::to_stdvec(&(old,)).unwrap();
        let due = (start() + Duration::from_secs(60))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        db.execute(
            "INSERT INTO _agents_schedules(method, args, kind, next_ms, created_ms) VALUES ('remind', ?1, 'once', ?2, 0)",
            rusqlite::params![args, due],
        )
        .unwrap();
    }
    rt.restart().await.unwrap();
    let a = rt.agent::<v2::Account>("old");
    assert_eq!(a.number("n".into()).await.unwrap(), Some(42));
    // The alarm index has no entry for the hand-written row; the call above woke the agent,
    // which re-derived its alarm from its schedule table.
    rt.advance(Duration::from_secs(61)).await;
    let reminded = a.load().await.unwrap().2;
    assert_eq!(
        reminded.and_then(|p| p.email),
        Some("old@example.com".into())
    );
}
