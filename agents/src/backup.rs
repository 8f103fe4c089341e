//! Backups of a data dir, taken while its runtime serves it, and restores.
//!
//! Each agent's database is copied with SQLite's `VACUUM INTO`: a consistent snapshot of what
//! it had committed when its copy was made, so a backup holds every write acknowledged before
//! the backup started (and, agent by agent, some made while it ran). A hibernated agent's file
//! is copied from outside its instance (an activation meanwhile waits for the copy, as for any
//! reader); a live agent copies its own database between two batches. The backup's alarm index
//! is made from the copies (each agent's earliest schedule), so it matches them exactly; its
//! catalog is the runtime's, marked for a check at the first start on it. Everything written is
//! fsynced before the backup is reported done.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rusqlite::{Connection, OpenFlags};

use crate::{
    address::AgentKey,
    alarms::AlarmIndex,
    catalog::{self, CATALOG_FILE},
    error::Error,
    registry::{Event, Shared},
    schedule,
    storage::{self, blocking, io},
};

/// What a backup copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct BackupReport {
    /// How many agents' databases.
    pub agents: u64,
    /// How many bytes they take in the backup.
    pub bytes: u64,
}

/// Copies the database `conn` has open into `to` (a new file): what it has committed, in one
/// read transaction. The copy is made under another name and renamed into place. Blocking.
pub(crate) fn vacuum_into(conn: &Connection, to: &Path) -> Result<(), Error> {
    let making = to.with_extension("sqlite-copying");
    let _ = fs::remove_file(&making);
    let target = making
        .to_str()
        .ok_or_else(|| Error::Config(format!("{} is not UTF-8", making.display())))?;
    conn.execute("VACUUM INTO ?1", [target])?;
    fs::rename(&making, to).map_err(io(to))
}

/// A backup being written to `dir`.
struct Target {
    dir: PathBuf,
    alarms: AlarmIndex,
    report: BackupReport,
}

impl Target {
    /// Starts a backup in `dir`, which must not exist or be empty. Blocking.
    fn create(dir: &Path) -> Result<Self, Error> {
        if fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(Error::Config(format!(
                "{} is not empty: a backup goes to a new directory",
                dir.display()
            )));
        }
        fs::create_dir_all(dir.join("agents")).map_err(io(dir))?;
        Ok(Target {
            dir: dir.to_owned(),
            alarms: AlarmIndex::open(dir)?,
            report: BackupReport::default(),
        })
    }

    /// Where the copy of `key`'s database goes (its folder made).
    fn path(&self, key: &AgentKey) -> Result<PathBuf, Error> {
        let path = storage::db_path(&self.dir, key);
        let folder = path.parent().expect("db_path has a parent");
        fs::create_dir_all(folder).map_err(io(folder))?;
        Ok(path)
    }

    /// Records the copy of `key` at `copy`: its alarm in the backup's index. Blocking.
    fn copied(&mut self, key: &AgentKey, copy: &Path) -> Result<(), Error> {
        let conn = Connection::open_with_flags(copy, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let earliest = schedule::earliest(&conn)?;
        drop(conn);
        if earliest.is_some() {
            self.alarms.set(key, earliest, false)?;
        }
        self.report.agents += 1;
        self.report.bytes += fs::metadata(copy).map_err(io(copy))?.len();
        Ok(())
    }

    /// Copies the catalog of `data_dir` (to be checked at the first start on the backup) and
    /// makes everything durable. Blocking.
    fn finish(self, data_dir: &Path) -> Result<BackupReport, Error> {
        let source = data_dir.join(CATALOG_FILE);
        if source.exists() {
            let from = Connection::open_with_flags(&source, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let copy = self.dir.join(CATALOG_FILE);
            vacuum_into(&from, &copy)?;
            Connection::open(&copy)?.execute(
                "INSERT OR REPLACE INTO catalog_meta(k, v) VALUES ('clean', '0')",
                [],
            )?;
        }
        drop(self.alarms);
        sync_tree(&self.dir)?;
        Ok(self.report)
    }
}

/// Fsyncs every file and folder under `dir`, and `dir`. Blocking.
fn sync_tree(dir: &Path) -> Result<(), Error> {
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            storage::sync_path(&path)?;
        }
    }
    storage::sync_path(dir)
}

/// Copies the database of `key` under `data_dir` to `to` from outside its runtime. `Ok(false)`
/// if it has no database; an error that [`is_live`] if its runtime has it open. Blocking.
fn copy_from_outside(data_dir: &Path, key: &AgentKey, to: &Path) -> Result<bool, Error> {
    let path = storage::db_path(data_dir, key);
    if !path.exists() {
        return Ok(false);
    }
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    // Busy at once if the runtime has it open (no waiting for it to hibernate).
    conn.busy_timeout(std::time::Duration::ZERO)?;
    vacuum_into(&conn, to)?;
    Ok(true)
}

/// Whether `e` says that the database is locked by the runtime that has it open.
fn is_live(e: &Error) -> bool {
    matches!(e, Error::Storage(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DatabaseBusy)
}

/// Backs up the data dir of the running runtime `shared` into `dest`.
pub(crate) async fn online(shared: &Arc<Shared>, dest: &Path) -> Result<BackupReport, Error> {
    let (sh, to) = (shared.clone(), dest.to_owned());
    let (mut target, agents) = blocking(move || {
        let target = Target::create(&to)?;
        sh.catalog.flush(false);
        Ok((target, sh.catalog.all()?))
    })
    .await?;
    let data_dir = &shared.config.data_dir;
    for key in agents {
        let copy = target.path(&key)?;
        let (dir, k, c) = (data_dir.clone(), key.clone(), copy.clone());
        let copied = match blocking(move || copy_from_outside(&dir, &k, &c)).await {
            Err(e) if is_live(&e) => {
                // Live: it copies its own database, between two batches.
                let (done, wait) = tokio::sync::oneshot::channel();
                let event = Event::Backup(copy.clone(), done);
                match shared.route(&key, event).await {
                    Ok(()) => wait.await.unwrap_or(Err(Error::Shutdown)).map(|()| true),
                    Err((e, _)) => Err(e),
                }
            }
            other => other,
        };
        match copied {
            Ok(true) => target.copied(&key, &copy)?,
            // Gone since it was listed (destroyed): not in the backup.
            Ok(false) | Err(Error::NoSuchAgent(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let dir = data_dir.clone();
    blocking(move || target.finish(&dir)).await
}

/// Backs up `data_dir`, whose lock the caller holds (no runtime serves it), into `dest`.
/// Blocking.
pub(crate) fn offline(data_dir: &Path, dest: &Path) -> Result<BackupReport, Error> {
    let mut target = Target::create(dest)?;
    for (_, path) in catalog::agent_files(data_dir)? {
        let Some(info) = catalog::read_agent(&path)? else {
            continue; // no address: not an agent yet
        };
        let key = AgentKey::new(&info.class, &info.name)?;
        let copy = target.path(&key)?;
        if copy_from_outside(data_dir, &key, &copy)? {
            target.copied(&key, &copy)?;
        }
    }
    target.finish(data_dir)
}

/// Restores the backup at `backup` into `data_dir`, which must have no agents, and whose lock
/// the caller holds. Blocking.
pub(crate) fn restore(backup: &Path, data_dir: &Path) -> Result<BackupReport, Error> {
    if !backup.join("agents").is_dir() {
        return Err(Error::Config(format!(
            "{} is not a backup (it has no agents folder)",
            backup.display()
        )));
    }
    let taken = [CATALOG_FILE, "alarms.sqlite", "agents"];
    if let Some(there) = taken.iter().find(|f| data_dir.join(f).exists()) {
        return Err(Error::Config(format!(
            "{} already holds a data dir ({there}): restore into a new or empty directory",
            data_dir.display()
        )));
    }
    let mut report = BackupReport::default();
    copy_tree(backup, data_dir, &mut report)?;
    sync_tree(data_dir)?;
    Ok(report)
}

/// Copies the files of the folder `from` into `to`, counting the agents' databases.
fn copy_tree(from: &Path, to: &Path, report: &mut BackupReport) -> Result<(), Error> {
    fs::create_dir_all(to).map_err(io(to))?;
    for entry in fs::read_dir(from).map_err(io(from))? {
        let path = entry.map_err(io(from))?.path();
        let target = to.join(path.file_name().expect("a folder's entry has a name"));
        if path.is_dir() {
            copy_tree(&path, &target, report)?;
        } else {
            let bytes = fs::copy(&path, &target).map_err(io(&target))?;
            if path
                .parent()
                .and_then(Path::parent)
                .and_then(Path::file_name)
                == Some("agents".as_ref())
            {
                report.agents += 1;
                report.bytes += bytes;
            }
        }
    }
    Ok(())
}
