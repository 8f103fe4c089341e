//! The catalog: a runtime-wide record of every agent that exists (class, name, id, when it was
//! created and last active, its database's size, its schedules and dead letters).
//!
//! It lives in `<data_dir>/catalog.sqlite` and is kept off the hot path: nothing is written per
//! call. An agent is noted when its first event succeeded on a new database, when its database
//! opens, and with its figures when it closes (hibernation, eviction, shutdown); a removed
//! agent's row goes. The notes travel over a channel to a writer thread that commits whatever
//! has accumulated in one transaction, without an fsync (SQLite's `synchronous=NORMAL` in WAL
//! mode).
//!
//! So a crash may lose the last notes, and the agents that were open then have old figures.
//! The catalog records whether the runtime that had it last shut down cleanly; a start after
//! one that did not walks the agents' directories (names only), reads the databases the catalog
//! does not know and those it lists as open, and drops the rows whose files are gone. (A data
//! dir from before the catalog is indexed the same way, once.)

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{mpsc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::{address::AgentKey, error::Error, lock::lock};

/// The catalog's file under the data dir.
pub(crate) const CATALOG_FILE: &str = "catalog.sqlite";

/// What the catalog knows of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentInfo {
    /// The agent's class.
    pub class: String,
    /// The agent's name.
    pub name: String,
    /// The agent's id (its database is `agents/<id[..2]>/<id>.sqlite` under the data dir).
    pub id: String,
    /// When its database was created.
    pub created: SystemTime,
    /// When its database last closed (or was created, if it has not closed since).
    pub last_active: SystemTime,
    /// The size of its database files when they last closed, in bytes.
    pub size: u64,
    /// How many schedules it had when it last closed.
    pub schedules: u64,
    /// How many dead letters it had when it last closed.
    pub dead_letters: u64,
    /// Whether it is live in this runtime now (the figures above are from its last close).
    pub live: bool,
}

/// What the catalog is told.
enum Note {
    /// A new database had its first event succeed.
    Created(AgentKey, u64),
    /// A database opened.
    Opened(AgentKey, u64),
    /// A database closed, with its figures then.
    Closed(AgentKey, Figures),
    /// An agent's files were removed.
    Removed(AgentKey),
    /// Answered once every note before it is written; `clean`: and the shutdown recorded as
    /// clean.
    Flush { done: mpsc::Sender<()>, clean: bool },
}

/// An agent's figures when its database closed.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figures {
    pub at_ms: u64,
    pub size: u64,
    pub schedules: u64,
    pub dead_letters: u64,
}

/// How many schedules and dead letters the agent database `conn` holds. Blocking.
pub(crate) fn counts(conn: &Connection) -> (u64, u64) {
    let counts = conn.query_row(
        "SELECT (SELECT count(*) FROM _agents_schedules), (SELECT count(*) FROM _agents_dead_letters)",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    );
    counts.unwrap_or_default()
}

/// The size of the database at `path` and its WAL, in bytes.
pub(crate) fn files_size(path: &Path) -> u64 {
    let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    size(path) + size(&path.with_extension("sqlite-wal"))
}

/// The runtime's catalog: notes go to its writer, lists are read from the file.
pub(crate) struct Catalog {
    notes: Mutex<mpsc::Sender<Note>>,
    reader: Mutex<Connection>,
}

impl Catalog {
    /// Opens (creating if needed) the catalog of `data_dir`, finds what a crash or an older
    /// runtime left out of it, and starts its writer. Blocking.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let path = data_dir.join(CATALOG_FILE);
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(TABLES)?;
        let clean = meta(&conn, "clean")?.as_deref() == Some("1");
        if !clean {
            let (found, dropped) = reconcile(&conn, data_dir)?;
            if found + dropped > 0 {
                tracing::info!(
                    "catalog: {found} agents found in the data dir that it did not list, {dropped} listed ones gone"
                );
            }
        }
        // Unclean until `close` says otherwise, durably before any agent runs.
        set_meta(&conn, "clean", "0", true)?;
        let reader = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let (notes, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("agents-catalog".into())
            .spawn(move || write_notes(conn, rx))
            .map_err(|e| Error::Internal(format!("the catalog's writer cannot start: {e}")))?;
        Ok(Catalog {
            notes: Mutex::new(notes),
            reader: Mutex::new(reader),
        })
    }

    fn note(&self, note: Note) {
        // The writer ends only with the catalog (or if writing panicked: logged there).
        let _ = lock(&self.notes).send(note);
    }

    /// `key`'s database was created at `at_ms`.
    pub fn created(&self, key: &AgentKey, at_ms: u64) {
        self.note(Note::Created(key.clone(), at_ms));
    }

    /// `key`'s database opened at `at_ms`.
    pub fn opened(&self, key: &AgentKey, at_ms: u64) {
        self.note(Note::Opened(key.clone(), at_ms));
    }

    /// `key`'s database closed, with `figures`.
    pub fn closed(&self, key: &AgentKey, figures: Figures) {
        self.note(Note::Closed(key.clone(), figures));
    }

    /// `key`'s files were removed.
    pub fn removed(&self, key: &AgentKey) {
        self.note(Note::Removed(key.clone()));
    }

    /// Waits until every note so far is written; `clean`: and records a clean shutdown, so that
    /// the next start trusts the catalog (once every database is closed). Blocking.
    pub fn flush(&self, clean: bool) {
        let (done, wait) = mpsc::channel();
        self.note(Note::Flush { done, clean });
        let _ = wait.recv();
    }

    /// The agents of `class`, by name, from the first after `after`, at most `limit`. Blocking.
    pub fn list(
        &self,
        class: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AgentInfo>, Error> {
        list(&lock(&self.reader), class, after, limit)
    }

    /// Every agent listed. Blocking.
    pub fn all(&self) -> Result<Vec<AgentKey>, Error> {
        let reader = lock(&self.reader);
        let mut stmt = reader.prepare_cached("SELECT class, name FROM agents")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut keys = Vec::new();
        for row in rows {
            let (class, name) = row?;
            match AgentKey::new(&class, &name) {
                Ok(key) => keys.push(key),
                Err(e) => tracing::warn!("catalog: {class}/{name} is no address: {e}"),
            }
        }
        Ok(keys)
    }

    /// The agents with the most dead letters (as of their last close), at most `limit`, as
    /// `class/name` and how many. Blocking.
    pub fn with_dead_letters(&self, limit: usize) -> Result<Vec<(String, u64)>, Error> {
        let reader = lock(&self.reader);
        let mut stmt = reader.prepare_cached(
            "SELECT class || '/' || name, dead_letters FROM agents WHERE dead_letters > 0
             ORDER BY dead_letters DESC, class, name LIMIT ?1",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map([limit], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The classes the catalog lists agents of, with how many. Blocking.
    pub fn classes(&self) -> Result<Vec<(String, u64)>, Error> {
        classes(&lock(&self.reader))
    }
}

const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS agents(
        class TEXT NOT NULL, name TEXT NOT NULL, id TEXT NOT NULL UNIQUE,
        created_ms INTEGER NOT NULL, active_ms INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0,
        schedules INTEGER NOT NULL DEFAULT 0, dead_letters INTEGER NOT NULL DEFAULT 0,
        open INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (class, name)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS catalog_meta(k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;";

fn meta(conn: &Connection, k: &str) -> Result<Option<String>, Error> {
    let v = conn
        .query_row("SELECT v FROM catalog_meta WHERE k = ?1", [k], |r| r.get(0))
        .optional()?;
    Ok(v)
}

fn set_meta(conn: &Connection, k: &str, v: &str, synced: bool) -> Result<(), Error> {
    if synced {
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    conn.execute(
        "INSERT INTO catalog_meta(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        [k, v],
    )?;
    if synced {
        conn.pragma_update(None, "synchronous", "NORMAL")?;
    }
    Ok(())
}

/// The writer: takes the notes that have accumulated and writes them in one transaction.
fn write_notes(mut conn: Connection, rx: mpsc::Receiver<Note>) {
    while let Ok(first) = rx.recv() {
        let (mut flushed, mut clean) = (Vec::new(), false);
        let mut notes = Vec::new();
        for note in std::iter::once(first).chain(rx.try_iter()) {
            match note {
                Note::Flush { done, clean: c } => {
                    flushed.push(done);
                    clean |= c;
                }
                note => notes.push(note),
            }
        }
        let mut written = write(&mut conn, &notes);
        if written.is_ok() && clean {
            written = set_meta(&conn, "clean", "1", true);
        }
        if let Err(e) = written {
            tracing::warn!(
                "catalog: {} notes not written (found again after a restart): {e}",
                notes.len()
            );
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

fn write(conn: &mut Connection, notes: &[Note]) -> Result<(), Error> {
    if notes.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for note in notes {
        match note {
            Note::Created(key, at) => {
                tx.prepare_cached(
                    "INSERT INTO agents(class, name, id, created_ms, active_ms, open) VALUES (?1, ?2, ?3, ?4, ?4, 1)
                     ON CONFLICT(class, name) DO UPDATE SET active_ms = excluded.active_ms, open = 1",
                )?
                .execute(params![key.class(), key.name(), key.id(), *at as i64])?;
            }
            Note::Opened(key, at) => {
                tx.prepare_cached(
                    "UPDATE agents SET active_ms = ?3, open = 1 WHERE class = ?1 AND name = ?2",
                )?
                .execute(params![key.class(), key.name(), *at as i64])?;
            }
            Note::Closed(key, f) => {
                tx.prepare_cached(
                    "INSERT INTO agents(class, name, id, created_ms, active_ms, size, schedules, dead_letters)
                     VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, ?7)
                     ON CONFLICT(class, name) DO UPDATE SET active_ms = excluded.active_ms,
                        size = excluded.size, schedules = excluded.schedules, dead_letters = excluded.dead_letters,
                        open = 0",
                )?
                .execute(params![
                    key.class(),
                    key.name(),
                    key.id(),
                    f.at_ms as i64,
                    f.size as i64,
                    f.schedules as i64,
                    f.dead_letters as i64
                ])?;
            }
            Note::Removed(key) => {
                tx.prepare_cached("DELETE FROM agents WHERE class = ?1 AND name = ?2")?
                    .execute([key.class(), key.name()])?;
            }
            Note::Flush { .. } => {}
        }
    }
    tx.commit()?;
    Ok(())
}

/// Makes the catalog list exactly the agents whose databases are under `data_dir`: adds those
/// it lacks and refreshes those it lists as open (reading their files), and drops those whose
/// file is gone. Returns how many it added and dropped. Blocking.
fn reconcile(conn: &Connection, data_dir: &Path) -> Result<(usize, usize), Error> {
    let on_disk = agent_files(data_dir)?;
    let listed: HashMap<String, bool> = {
        let mut stmt = conn.prepare("SELECT id, open FROM agents")?;
        let ids = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        ids.collect::<Result<_, _>>()?
    };
    let mut found = 0;
    for (id, path) in &on_disk {
        let open = match listed.get(id) {
            Some(false) => continue,
            Some(true) => true,
            None => false,
        };
        match read_agent(path) {
            Ok(Some(agent)) => {
                conn.execute(
                    "INSERT INTO agents(class, name, id, created_ms, active_ms, size, schedules, dead_letters)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(class, name) DO UPDATE SET size = excluded.size,
                        schedules = excluded.schedules, dead_letters = excluded.dead_letters, open = 0",
                    params![
                        agent.class,
                        agent.name,
                        id,
                        ms(agent.created) as i64,
                        ms(agent.last_active) as i64,
                        agent.size as i64,
                        agent.schedules as i64,
                        agent.dead_letters as i64
                    ],
                )?;
                found += usize::from(!open);
            }
            // A file with no address yet (its first commit was lost) is no agent.
            Ok(None) => {}
            Err(e) => tracing::warn!("catalog: {} is not listed: {e}", path.display()),
        }
    }
    let on_disk: HashSet<&String> = on_disk.iter().map(|(id, _)| id).collect();
    let mut dropped = 0;
    for id in listed.keys().filter(|id| !on_disk.contains(id)) {
        dropped += conn.execute("DELETE FROM agents WHERE id = ?1", [id])?;
    }
    Ok((found, dropped))
}

/// The agents' database files under `data_dir`, by id (the template aside).
pub(crate) fn agent_files(data_dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let agents = data_dir.join("agents");
    let mut found = Vec::new();
    let shards = match fs::read_dir(&agents) {
        Ok(shards) => shards,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io(&agents)(e)),
    };
    for shard in shards {
        let shard = shard.map_err(io(&agents))?.path();
        if !shard.is_dir() {
            continue; // the template
        }
        for file in fs::read_dir(&shard).map_err(io(&shard))? {
            let path = file.map_err(io(&shard))?.path();
            let id = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".sqlite"));
            if let Some(id) = id {
                found.push((id.to_owned(), path.clone()));
            }
        }
    }
    Ok(found)
}

/// What the (closed) agent database at `path` says of its agent, if it records an address: the
/// file's times stand for its creation and last activity. Blocking.
pub(crate) fn read_agent(path: &Path) -> Result<Option<AgentInfo>, Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let address = conn
        .query_row(
            "SELECT (SELECT v FROM _agents_meta WHERE k = 'class'), (SELECT v FROM _agents_meta WHERE k = 'name')",
            [],
            |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?)),
        )
        .optional();
    let Ok(Some((Some(class), Some(name)))) = address else {
        return Ok(None);
    };
    let (schedules, dead_letters) = counts(&conn);
    drop(conn);
    let meta = fs::metadata(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
    Ok(Some(AgentInfo {
        id: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        class,
        name,
        created: meta.created().unwrap_or(modified),
        last_active: modified,
        size: files_size(path),
        schedules,
        dead_letters,
        live: false,
    }))
}

/// Milliseconds since the Unix epoch.
fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

const COLUMNS: &str = "class, name, id, created_ms, active_ms, size, schedules, dead_letters";

fn info(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentInfo> {
    Ok(AgentInfo {
        class: r.get(0)?,
        name: r.get(1)?,
        id: r.get(2)?,
        created: time(r.get(3)?),
        last_active: time(r.get(4)?),
        size: r.get::<_, i64>(5)? as u64,
        schedules: r.get::<_, i64>(6)? as u64,
        dead_letters: r.get::<_, i64>(7)? as u64,
        live: false,
    })
}

/// The agents of `class` by name, from the first after `after`, at most `limit`.
pub(crate) fn list(
    conn: &Connection,
    class: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<AgentInfo>, Error> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM agents WHERE class = ?1 AND (?2 IS NULL OR name > ?2) ORDER BY name LIMIT ?3"
    ))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![class, after, limit], info)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The agent `class`/`name`, if listed.
pub(crate) fn get(conn: &Connection, class: &str, name: &str) -> Result<Option<AgentInfo>, Error> {
    let sql = format!("SELECT {COLUMNS} FROM agents WHERE class = ?1 AND name = ?2");
    Ok(conn.query_row(&sql, [class, name], info).optional()?)
}

/// The classes listed, with how many agents each.
pub(crate) fn classes(conn: &Connection) -> Result<Vec<(String, u64)>, Error> {
    let mut stmt =
        conn.prepare_cached("SELECT class, count(*) FROM agents GROUP BY class ORDER BY class")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
