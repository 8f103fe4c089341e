//! A data dir seen from outside its runtime: what the `agents` command-line tool reads and
//! mends (see the README's "Operating" section).
//!
//! Reading is safe while a runtime serves the data dir: the catalog is read as SQLite readers
//! read (it is in WAL mode), and an agent's database only while the agent is hibernated (a live
//! agent's file is locked by the runtime, and reading it is refused with
//! [`Error::AgentLive`]). A read holds the file for as long as it runs, and an activation of
//! that agent meanwhile waits for it.
//!
//! Changing anything (a dead letter retried or discarded, an agent removed) takes the data
//! dir's lock first, as a runtime does: it is refused with [`Error::DataDirInUse`] while a
//! runtime serves the data dir, and a runtime cannot start meanwhile.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rusqlite::{types::ValueRef, Connection, OpenFlags, OptionalExtension};

use crate::{
    address::AgentKey,
    alarms::AlarmIndex,
    backup::{self, BackupReport},
    catalog::{self, AgentInfo, CATALOG_FILE},
    error::Error,
    schedule::{self, DeadLetter, Schedule},
    storage::{self, Stored},
};

/// Restores the backup at `backup` (made by [`Runtime::backup`](crate::Runtime::backup) or
/// [`Locked::backup`]) into `data_dir`: a new directory, or one without a data dir in it. The
/// directory's lock is held meanwhile, so no runtime starts on it half restored.
pub fn restore(backup: &Path, data_dir: &Path) -> Result<BackupReport, Error> {
    fs::create_dir_all(data_dir).map_err(storage::io(data_dir))?;
    let _lock = storage::lock_data_dir(data_dir)?;
    backup::restore(backup, data_dir)
}

/// A data dir, opened for reading.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// The data dir at `path`: it must hold a runtime's files (its lock file, its catalog or its
    /// agents).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let known = [storage::LOCK_FILE, CATALOG_FILE, "agents"];
        if !known.iter().any(|f| path.join(f).exists()) {
            return Err(Error::Config(format!(
                "{} is not a data dir (it has none of {})",
                path.display(),
                known.join(", ")
            )));
        }
        Ok(DataDir { path })
    }

    /// The data dir's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Who serves the data dir now, as its lock file says (`pid 123`), if a runtime does.
    pub fn served_by(&self) -> Option<String> {
        let mut file = fs::File::open(self.path.join(storage::LOCK_FILE)).ok()?;
        match file.try_lock_shared() {
            Err(fs::TryLockError::WouldBlock) => Some(storage::holder(&mut file)),
            _ => None,
        }
    }

    /// The catalog, read-only; `None` if the data dir has none yet (no runtime of a version
    /// that keeps one ran on it).
    fn catalog(&self) -> Result<Option<Connection>, Error> {
        let path = self.path.join(CATALOG_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        Ok(Some(conn))
    }

    /// Every agent, from the catalog (or, without one, from the agents' files).
    fn all(&self) -> Result<Vec<AgentInfo>, Error> {
        if self.catalog()?.is_some() {
            let mut all = Vec::new();
            for (class, _) in self.classes()? {
                all.extend(self.agents(&class, None, usize::MAX)?);
            }
            return Ok(all);
        }
        let mut all = Vec::new();
        for (_, path) in catalog::agent_files(&self.path)? {
            if let Some(info) = catalog::read_agent(&path)? {
                all.push(info);
            }
        }
        all.sort_by(|a, b| (&a.class, &a.name).cmp(&(&b.class, &b.name)));
        Ok(all)
    }

    /// The classes with agents, and how many each has.
    pub fn classes(&self) -> Result<Vec<(String, u64)>, Error> {
        match self.catalog()? {
            Some(conn) => catalog::classes(&conn),
            None => {
                let mut counts = std::collections::BTreeMap::new();
                for agent in self.all()? {
                    *counts.entry(agent.class).or_insert(0) += 1;
                }
                Ok(counts.into_iter().collect())
            }
        }
    }

    /// The agents of `class` by name: at most `limit`, from the first after `after`.
    pub fn agents(
        &self,
        class: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AgentInfo>, Error> {
        match self.catalog()? {
            Some(conn) => catalog::list(&conn, class, after, limit),
            None => Ok(self
                .all()?
                .into_iter()
                .filter(|a| a.class == class && after.is_none_or(|after| a.name.as_str() > after))
                .take(limit)
                .collect()),
        }
    }

    /// What the catalog lists of the agent `class`/`name`, if it lists it.
    pub fn info(&self, class: &str, name: &str) -> Result<Option<AgentInfo>, Error> {
        match self.catalog()? {
            Some(conn) => catalog::get(&conn, class, name),
            None => Ok(None),
        }
    }

    /// The database of the agent `class`/`name`, opened read-only. Refused if the agent is live
    /// in the runtime serving the data dir, or has no database.
    pub fn agent(&self, class: &str, name: &str) -> Result<AgentDb, Error> {
        let key = AgentKey::new(class, name)?;
        let path = storage::db_path(&self.path, &key);
        if !path.exists() {
            return Err(Error::NoSuchAgent(key.to_string()));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags)?;
        conn.pragma_update(None, "query_only", true)?;
        // The first read takes SQLite's shared lock, which a live agent's lock refuses.
        let read = conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()));
        if let Err(rusqlite::Error::SqliteFailure(e, _)) = &read {
            if e.code == rusqlite::ErrorCode::DatabaseBusy {
                let by = self
                    .served_by()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                return Err(Error::AgentLive(format!(
                    "{key} is live in the runtime serving {}{by}: its database can be read once it hibernates (or with Builder::readable_while_live)",
                    self.path.display()
                )));
            }
        }
        read?;
        Ok(AgentDb { key, path, conn })
    }

    /// Takes the data dir's lock for changes: refused while a runtime serves it.
    pub fn lock(&self) -> Result<Locked<'_>, Error> {
        let lock = storage::lock_data_dir(&self.path)?;
        Ok(Locked {
            dir: self,
            _lock: lock,
        })
    }
}

/// An agent's database, open read-only.
#[derive(Debug)]
pub struct AgentDb {
    key: AgentKey,
    path: PathBuf,
    conn: Connection,
}

/// A row's value, for display: SQL's types as JSON (a blob as `{"blob": <bytes>}`).
fn json(value: ValueRef<'_>) -> serde_json::Value {
    match value {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => i.into(),
        ValueRef::Real(f) => f.into(),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into(),
        ValueRef::Blob(b) => serde_json::json!({ "blob": b.len() }),
    }
}

/// A durable value as the runtime stored it: its JSON, or a note for a postcard blob written
/// before runtime schema 4 (which only its type can decode).
fn stored(value: Stored) -> serde_json::Value {
    match value {
        Stored::Json(text) => serde_json::from_str(&text).unwrap_or(text.into()),
        Stored::Postcard(bytes) => format!("<postcard, {} bytes>", bytes.len()).into(),
    }
}

/// A connection the agent's database records as open.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredConnection {
    /// Its id.
    pub id: String,
    /// Who the admission hook said it is, if it said.
    pub principal: Option<String>,
    /// The subprotocol it speaks.
    pub protocol: Option<String>,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its state, as JSON.
    pub state: serde_json::Value,
}

impl AgentDb {
    /// The agent's address.
    pub fn key(&self) -> &AgentKey {
        &self.key
    }

    /// What its file says of it (the file's times stand for its creation and last activity;
    /// [`DataDir::info`] has the catalog's).
    pub fn info(&self) -> Result<AgentInfo, Error> {
        catalog::read_agent(&self.path)?.ok_or_else(|| Error::NoSuchAgent(self.key.to_string()))
    }

    /// Its key-value entries (`ctx.kv()`), values as JSON.
    pub fn kv(&self) -> Result<Vec<(String, serde_json::Value)>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT k, v FROM _agents_kv ORDER BY k")?;
        let rows = stmt.query_map([], |r| {
            let k = match r.get_ref(0)? {
                ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
                other => json(other).to_string(),
            };
            Ok((k, stored(r.get(1)?)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Its shared state (`ctx.set_state`), as JSON, if it has one.
    pub fn state(&self) -> Result<Option<serde_json::Value>, Error> {
        let state = self
            .conn
            .query_row("SELECT state FROM _agents_state WHERE id = 0", [], |r| {
                r.get::<_, Stored>(0)
            })
            .optional()?;
        Ok(state.map(stored))
    }

    /// Its schedules, the next first.
    pub fn schedules(&self) -> Result<Vec<Schedule>, Error> {
        schedule::list(&self.conn)
    }

    /// Its dead letters.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, Error> {
        schedule::dead_letters(&self.conn)
    }

    /// The connections it records as open (those of a runtime that stopped are removed when
    /// the agent next wakes).
    pub fn connections(&self) -> Result<Vec<StoredConnection>, Error> {
        let mut stmt = self.conn.prepare(
            "SELECT id, principal, protocol, state,
                    (SELECT group_concat(tag, char(31)) FROM _agents_conn_tags WHERE conn = c.id)
             FROM _agents_connections c ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            let tags: Option<String> = r.get(4)?;
            Ok(StoredConnection {
                id: r.get(0)?,
                principal: r.get(1)?,
                protocol: r.get(2)?,
                state: r
                    .get::<_, Option<Stored>>(3)?
                    .map_or(serde_json::Value::Null, stored),
                tags: tags
                    .map(|t| t.split('\u{1f}').map(str::to_owned).collect())
                    .unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Its tables (the runtime's `_agents_*` ones included) and their row counts.
    pub fn tables(&self) -> Result<Vec<(String, u64)>, Error> {
        let mut stmt = self.conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )?;
        let names: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut tables = Vec::new();
        for name in names {
            let quoted = format!("\"{}\"", name.replace('"', "\"\""));
            let count: i64 =
                self.conn
                    .query_row(&format!("SELECT count(*) FROM {quoted}"), [], |r| r.get(0))?;
            tables.push((name, count as u64));
        }
        Ok(tables)
    }

    /// Runs one read-only statement: its column names and rows (values as JSON).
    pub fn query(&self, sql: &str) -> Result<(Vec<String>, Vec<Vec<serde_json::Value>>), Error> {
        let mut stmt = self.conn.prepare(sql)?;
        if !stmt.readonly() {
            return Err(Error::Config(
                "only statements that read are run here (this database is opened read-only)".into(),
            ));
        }
        let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
        let width = columns.len();
        let rows = stmt.query_map([], |r| (0..width).map(|i| r.get_ref(i).map(json)).collect())?;
        Ok((columns, rows.collect::<Result<_, _>>()?))
    }
}

/// A data dir whose lock this process holds: no runtime serves it meanwhile.
#[derive(Debug)]
pub struct Locked<'a> {
    dir: &'a DataDir,
    _lock: fs::File,
}

impl Locked<'_> {
    fn open(&self, class: &str, name: &str) -> Result<(AgentKey, Connection), Error> {
        let key = AgentKey::new(class, name)?;
        let path = storage::db_path(&self.dir.path, &key);
        if !path.exists() {
            return Err(Error::NoSuchAgent(key.to_string()));
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok((key, conn))
    }

    /// Puts the dead letter `id` of `class`/`name` back on its schedule, due now, and moves
    /// the agent's alarm so that the runtime runs it once it starts. Returns the new schedule's
    /// id, or `None` if there is no such dead letter.
    pub fn retry_dead_letter(
        &self,
        class: &str,
        name: &str,
        id: i64,
    ) -> Result<Option<i64>, Error> {
        let (key, conn) = self.open(class, name)?;
        let now = crate::clock::Clock::system().now_ms();
        let retried = schedule::retry_dead_letter(&conn, id, now)?;
        if retried.is_some() {
            // Early, never late: the index is moved before anything else could miss it.
            let alarms = AlarmIndex::open(&self.dir.path)?;
            let at = alarms.get(&key).map_or(now, |at| at.min(now));
            alarms.set(&key, Some(at), true)?;
        }
        Ok(retried)
    }

    /// Deletes the dead letter `id` of `class`/`name`. Returns whether there was one.
    pub fn discard_dead_letter(&self, class: &str, name: &str, id: i64) -> Result<bool, Error> {
        let (_, conn) = self.open(class, name)?;
        schedule::discard_dead_letter(&conn, id)
    }

    /// Backs the data dir up into `dest` (a new or empty directory), as
    /// [`Runtime::backup`](crate::Runtime::backup) does for a data dir a runtime serves.
    pub fn backup(&self, dest: &Path) -> Result<BackupReport, Error> {
        backup::offline(&self.dir.path, dest)
    }

    /// Removes the agent `class`/`name`: its files, its alarm and its catalog entry. The next
    /// event for it finds a new, empty agent.
    pub fn remove(&self, class: &str, name: &str) -> Result<(), Error> {
        let key = AgentKey::new(class, name)?;
        if !storage::db_path(&self.dir.path, &key).exists() {
            return Err(Error::NoSuchAgent(key.to_string()));
        }
        AlarmIndex::open(&self.dir.path)?.set(&key, None, true)?;
        storage::remove(&self.dir.path, &key)?;
        let catalog = self.dir.path.join(CATALOG_FILE);
        if catalog.exists() {
            Connection::open(&catalog)?.execute(
                "DELETE FROM agents WHERE class = ?1 AND name = ?2",
                [key.class(), key.name()],
            )?;
        }
        Ok(())
    }
}
