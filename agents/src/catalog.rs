//! The catalog: a runtime-wide record of every agent that exists (class, name, id, when it was
//! created and last active, its database's size, its schedules and dead letters).
//!
//! It lives in `<data_dir>/catalog.sqlite` and is kept off the hot path: nothing is written per
//! call. An agent is noted when its first event succeeded on a new database, and with its
//! figures when its database closes (hibernation, eviction, shutdown); a removed agent's row
//! goes. The notes travel over a channel to a writer thread that commits what accumulates over
//! up to [`GATHER`] in one transaction, without an fsync (SQLite's `synchronous=NORMAL` in WAL
//! mode).
//!
//! So a crash may lose the last notes, and the agents that were open then have old figures.
//! The catalog records whether the runtime that had it last shut down cleanly; a start after
//! one that did not walks the agents' directories, reads the databases the catalog does not
//! know and those whose files' size is not what it recorded (those written since their last
//! close: a crash leaves their WAL), and drops the rows whose files are gone. (A data dir from
//! before the catalog is indexed the same way, once.)
//!
//! Everything in it can be found again in the agents' files: a runtime that cannot read a
//! catalog (`user_version` newer than its own) rebuilds it from them.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{mpsc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::{address::AgentKey, error::Error, lock::lock, storage::io};

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
    /// Its schedules and dead letters, if they were counted (`None`: as they were).
    pub counts: Option<(u64, u64)>,
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
    notes: mpsc::Sender<Note>,
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
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > VERSION {
            // Written by a newer runtime: what it holds is found again in the agents' files.
            tracing::warn!("catalog: format {version} is newer than this runtime's ({VERSION}): rebuilding it from the agents' files");
            conn.execute_batch("DROP TABLE IF EXISTS agents; DROP TABLE IF EXISTS catalog_meta;")?;
        }
        conn.execute_batch(TABLES)?;
        conn.pragma_update(None, "user_version", VERSION)?;
        let clean = meta(&conn, "clean")?.as_deref() == Some("1");
        if !clean {
            let (found, dropped) = reconcile(&conn, data_dir)?;
            if found + dropped > 0 {
                tracing::info!(
                    "catalog: {found} agents found in the data dir that it did not list, {dropped} listed ones gone"
                );
            }
        }
        // Unclean until a shutdown's `flush(true)` says otherwise, durably before any agent runs.
        set_meta(&conn, "clean", "0", true)?;
        let reader = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let (notes, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("agents-catalog".into())
            .spawn(move || write_notes(conn, rx))
            .map_err(|e| Error::Internal(format!("the catalog's writer cannot start: {e}")))?;
        Ok(Catalog {
            notes,
            reader: Mutex::new(reader),
        })
    }

    fn note(&self, note: Note) {
        // The writer ends only with the catalog (or if writing panicked: logged there).
        let _ = self.notes.send(note);
    }

    /// `key`'s database was created at `at_ms`.
    pub fn created(&self, key: &AgentKey, at_ms: u64) {
        self.note(Note::Created(key.clone(), at_ms));
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
        class TEXT NOT NULL, name TEXT NOT NULL,
        created_ms INTEGER NOT NULL, active_ms INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0,
        schedules INTEGER NOT NULL DEFAULT 0, dead_letters INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (class, name)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS catalog_meta(k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;";

/// The catalog's format (its `user_version`).
const VERSION: i64 = 1;

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

/// How long the writer gathers notes before it writes them (unless a flush is asked for).
pub(crate) const GATHER: Duration = Duration::from_millis(50);

/// The writer: takes the notes that accumulate over [`GATHER`] (or until a flush) and writes
/// them in one transaction.
fn write_notes(mut conn: Connection, rx: mpsc::Receiver<Note>) {
    while let Ok(first) = rx.recv() {
        let (mut flushed, mut clean) = (Vec::new(), false);
        let mut notes = Vec::new();
        let until = std::time::Instant::now() + GATHER;
        let mut next = Some(first);
        while let Some(note) = next.take() {
            match note {
                Note::Flush { done, clean: c } => {
                    flushed.push(done);
                    clean |= c;
                }
                note => notes.push(note),
            }
            next = if flushed.is_empty() {
                rx.recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
                    .ok()
            } else {
                rx.try_recv().ok()
            };
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
                    "INSERT INTO agents(class, name, created_ms, active_ms) VALUES (?1, ?2, ?3, ?3)
                     ON CONFLICT(class, name) DO UPDATE SET active_ms = excluded.active_ms",
                )?
                .execute(params![key.class(), key.name(), *at as i64])?;
            }
            Note::Closed(key, f) => {
                let (schedules, dead_letters) = f.counts.unzip();
                tx.prepare_cached(
                    "INSERT INTO agents(class, name, created_ms, active_ms, size, schedules, dead_letters)
                     VALUES (?1, ?2, ?3, ?3, ?4, coalesce(?5, 0), coalesce(?6, 0))
                     ON CONFLICT(class, name) DO UPDATE SET active_ms = excluded.active_ms,
                        size = excluded.size,
                        schedules = coalesce(?5, schedules), dead_letters = coalesce(?6, dead_letters)",
                )?
                .execute(params![
                    key.class(),
                    key.name(),
                    f.at_ms as i64,
                    f.size as i64,
                    schedules.map(|n| n as i64),
                    dead_letters.map(|n| n as i64)
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
/// it lacks and refreshes those whose files' size is not the one it recorded (reading their
/// files), and drops those whose file is gone. Returns how many it added and dropped. Blocking.
fn reconcile(conn: &Connection, data_dir: &Path) -> Result<(usize, usize), Error> {
    let on_disk = agent_files(data_dir)?;
    // Listed agents by id (the name of their file), with their address and recorded size.
    let mut listed: HashMap<String, ((String, String), i64)> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT class, name, size FROM agents")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        for row in rows {
            let (class, name, size): (String, String, i64) = row?;
            let id = AgentKey::new(&class, &name).map_or_else(|_| String::new(), |k| k.id());
            listed.insert(id, ((class, name), size));
        }
    }
    let mut found = 0;
    for (id, path) in &on_disk {
        let known = match listed.get(id) {
            Some((_, size)) if *size as u64 == files_size(path) => continue,
            Some(_) => true,
            None => false,
        };
        match read_agent(path) {
            Ok(Some(agent)) => {
                conn.execute(
                    "INSERT INTO agents(class, name, created_ms, active_ms, size, schedules, dead_letters)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT(class, name) DO UPDATE SET size = excluded.size,
                        schedules = excluded.schedules, dead_letters = excluded.dead_letters",
                    params![
                        agent.class,
                        agent.name,
                        ms(agent.created) as i64,
                        ms(agent.last_active) as i64,
                        agent.size as i64,
                        agent.schedules as i64,
                        agent.dead_letters as i64
                    ],
                )?;
                found += usize::from(!known);
            }
            // A file with no address yet (its first commit was lost) is no agent.
            Ok(None) => {}
            Err(e) => tracing::warn!("catalog: {} is not listed: {e}", path.display()),
        }
    }
    let on_disk: HashSet<&String> = on_disk.iter().map(|(id, _)| id).collect();
    let mut dropped = 0;
    for (id, ((class, name), _)) in &listed {
        if !on_disk.contains(id) {
            let gone = "DELETE FROM agents WHERE class = ?1 AND name = ?2";
            dropped += conn.execute(gone, [class, name])?;
        }
    }
    Ok((found, dropped))
}

/// The agents' database files under `data_dir`, by id (the template aside).
pub(crate) fn agent_files(data_dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
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
    let meta = fs::metadata(path).map_err(io(path))?;
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

const COLUMNS: &str = "class, name, created_ms, active_ms, size, schedules, dead_letters";

fn info(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentInfo> {
    let (class, name): (String, String) = (r.get(0)?, r.get(1)?);
    Ok(AgentInfo {
        id: AgentKey::new(&class, &name).map_or_else(|_| String::new(), |k| k.id()),
        class,
        name,
        created: time(r.get(2)?),
        last_active: time(r.get(3)?),
        size: r.get::<_, i64>(4)? as u64,
        schedules: r.get::<_, i64>(5)? as u64,
        dead_letters: r.get::<_, i64>(6)? as u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(data_dir: &Path) -> Vec<(String, u64)> {
        Catalog::open(data_dir).unwrap().classes().unwrap()
    }

    #[test]
    fn a_catalog_of_a_newer_format_is_rebuilt_from_the_agents_files() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        catalog.created(&AgentKey::new("counter", "a").unwrap(), 1);
        catalog.flush(true);
        assert_eq!(listed(dir.path()), [("counter".to_owned(), 1)]);
        // A newer runtime wrote it (and no agent file backs the row): it is rebuilt.
        let conn = Connection::open(dir.path().join(CATALOG_FILE)).unwrap();
        conn.pragma_update(None, "user_version", VERSION + 1)
            .unwrap();
        drop(conn);
        assert_eq!(listed(dir.path()), []);
        let conn = Connection::open(dir.path().join(CATALOG_FILE)).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, VERSION);
    }
}
