//! Spare files: new agents' databases made ahead of time, so that a new agent's activation
//! renames two files into place instead of creating them.
//!
//! Creating a file is the dearest part of a new agent that is not SQLite's: an inode to
//! allocate (on a journal-less ext4, a scan past the inodes deleted in the last 30 s), for the
//! database and again for its WAL, and the copy of the template to write and sync. A spare is
//! both, made by a maker task while the runtime has time: `spare/<n>.sqlite`, a synced copy of
//! the template, and `spare/<n>.sqlite-wal`, empty. [`Spares::take`] renames the WAL, then the
//! database, to an agent's names; its directory's entries become durable as a new database's
//! always do, by the sync that follows the first commit's (see `storage::Opened::dir_unsynced`).
//!
//! A crash may leave a spare half made or half taken; [`Spares::open`] keeps only whole ones:
//! a database with an empty WAL, each with one name (a rename whose source's removal was lost
//! could leave a spare that is also an agent's file: it is let go, not handed out again).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::Notify;

use crate::{
    error::Error,
    lock::lock,
    registry::Shared,
    storage::{self, io, wal_path, Durability},
};

/// The spares' directory under the data dir.
const DIR: &str = "spare";

/// A runtime's spare files.
pub(crate) struct Spares {
    data_dir: PathBuf,
    dir: PathBuf,
    durability: Durability,
    /// How many the maker keeps ready.
    want: usize,
    /// The numbers of the spares ready, the last made last.
    ready: Mutex<Vec<u64>>,
    /// The number of the next spare made.
    next: AtomicU64,
    /// Wakes the maker: a new agent wanted a spare, or the runtime closes.
    taken: Notify,
}

impl Spares {
    /// The spares of `data_dir`, of which the maker keeps `want` ready: those left by the last
    /// runtime that are whole, the rest removed. Blocking.
    pub(crate) fn open(
        data_dir: &Path,
        durability: Durability,
        want: usize,
    ) -> Result<Self, Error> {
        let dir = data_dir.join(DIR);
        if want > 0 {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        // None wanted and none left: no directory either.
        let entries = match fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && want == 0 => Vec::new(),
            entries => entries
                .and_then(|entries| entries.collect::<Result<Vec<_>, _>>())
                .map_err(io(&dir))?,
        };
        let (mut ready, mut wals, mut others) = (Vec::new(), Vec::new(), Vec::new());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().unwrap_or_default();
            let number = |suffix| {
                name.strip_suffix(suffix)
                    .and_then(|n| n.parse::<u64>().ok())
            };
            if let Some(n) = number(".sqlite").filter(|_| is_whole(&path)) {
                ready.push(n);
            } else if let Some(n) = number(".sqlite-wal") {
                wals.push((n, path)); // kept if its database is whole
            } else if !path.is_dir() {
                others.push(path); // half made or half taken
            }
        }
        ready.sort_unstable();
        // More than wanted (fewer are wanted since): the newest go.
        for n in ready.split_off(want.min(ready.len())) {
            let db = spare_path(&dir, n);
            others.extend([wal_path(&db), db]);
        }
        let lone = wals
            .into_iter()
            .filter(|(n, _)| ready.binary_search(n).is_err());
        others.extend(lone.map(|(_, wal)| wal));
        for path in others {
            storage::remove_file(&path)?;
        }
        let next = ready.last().map_or(0, |n| n + 1);
        Ok(Spares {
            data_dir: data_dir.to_owned(),
            dir,
            durability,
            want,
            ready: Mutex::new(ready),
            next: AtomicU64::new(next),
            taken: Notify::new(),
        })
    }

    /// Makes a ready spare the database `to` (and its WAL), if there is one: whether it did.
    /// Blocking.
    pub(crate) fn take(&self, to: &Path) -> Result<bool, Error> {
        let taken = self.take_one(to);
        // After the spare left the list: the maker, woken, sees one fewer (or learns that a
        // first new agent came).
        self.taken.notify_one();
        taken
    }

    fn take_one(&self, to: &Path) -> Result<bool, Error> {
        loop {
            let Some(n) = lock(&self.ready).pop() else {
                return Ok(false);
            };
            let db = spare_path(&self.dir, n);
            // The WAL first: a crash between the two leaves an empty WAL where the agent has
            // no database yet, which a new database is at ease with; the other way round, the
            // new database could meet the WAL of an agent removed before it.
            // A spare gone from under us (removed by hand) leaves the next one to try.
            match fs::rename(wal_path(&db), wal_path(to)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                renamed => renamed.map_err(io(to))?,
            }
            match fs::rename(&db, to) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                renamed => renamed.map_err(io(to))?,
            }
            return Ok(true);
        }
    }

    /// How many spares are ready.
    pub(crate) fn ready(&self) -> usize {
        lock(&self.ready).len()
    }

    /// Wakes the maker (to see that the runtime closes).
    pub(crate) fn wake(&self) {
        self.taken.notify_one();
    }

    /// Makes one spare: its empty WAL, then its database (a synced copy of the template under
    /// `Durability::Full`, renamed into place: whole when it has its name). Blocking.
    pub(crate) fn make_one(&self) -> Result<(), Error> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let db = spare_path(&self.dir, n);
        let wal = wal_path(&db);
        fs::File::create(&wal).map_err(io(&wal))?;
        storage::from_template(&self.data_dir, &db, self.durability)?;
        lock(&self.ready).push(n);
        Ok(())
    }
}

/// Keeps `shared`'s spares ready until the runtime closes: makes one at a time on a blocking
/// thread whenever fewer than wanted are ready, from the first new agent on (or from the start,
/// if the last runtime left some: a runtime that makes no agent makes no spare). A spare it
/// fails to make is tried again a second later (the disk may be full: the activations that
/// find no spare say so themselves).
pub(crate) async fn keep_ready(shared: Arc<Shared>) {
    let spares = &shared.spares;
    if spares.want == 0 {
        return; // those left are still taken, none made
    }
    let mut wanted = spares.ready() > 0;
    loop {
        let taken = spares.taken.notified();
        if shared.is_closed() {
            return;
        }
        if !wanted || spares.ready() >= spares.want {
            taken.await;
            wanted = true;
            continue;
        }
        let maker = shared.clone();
        if let Err(e) = storage::blocking(move || maker.spares.make_one()).await {
            tracing::warn!("could not make a spare database file: {e}");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

/// The database of spare `n` in `dir`.
fn spare_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n}.sqlite"))
}

/// Whether the spare database `db` is whole: it has one name, and an empty WAL of one name.
fn is_whole(db: &Path) -> bool {
    let single = |path: &Path, empty: bool| {
        fs::symlink_metadata(path)
            .is_ok_and(|m| m.is_file() && m.nlink() == 1 && (!empty || m.len() == 0))
    };
    single(db, false) && single(&wal_path(db), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spares(dir: &Path, want: usize) -> Spares {
        storage::make_dirs(dir, Durability::Full).unwrap();
        Spares::open(dir, Durability::Full, want).unwrap()
    }

    #[test]
    fn a_spare_becomes_a_database_with_an_empty_wal() {
        let dir = tempfile::tempdir().unwrap();
        let s = spares(dir.path(), 2);
        let to = dir.path().join("a.sqlite");
        assert!(!s.take(&to).unwrap(), "none made yet");
        s.make_one().unwrap();
        s.make_one().unwrap();
        assert_eq!(s.ready(), 2);
        assert!(s.take(&to).unwrap());
        assert_eq!(s.ready(), 1);
        assert_eq!(fs::metadata(wal_path(&to)).unwrap().len(), 0);
        let conn = rusqlite::Connection::open(&to).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = '_agents_meta'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 1, "a copy of the template");
        // The one left is the older one's successor: numbers are never reused.
        assert!(!spare_path(&s.dir, 1).exists());
        assert!(spare_path(&s.dir, 0).exists());
    }

    #[test]
    fn none_wanted_makes_no_directory() {
        let dir = tempfile::tempdir().unwrap();
        let s = spares(dir.path(), 0);
        assert!(!dir.path().join(DIR).exists());
        assert!(!s.take(&dir.path().join("a.sqlite")).unwrap());
    }

    #[test]
    fn fewer_wanted_than_left_keeps_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let s = spares(dir.path(), 3);
        for _ in 0..3 {
            s.make_one().unwrap();
        }
        let d = s.dir.clone();
        drop(s);
        let s = spares(dir.path(), 1);
        assert_eq!(*lock(&s.ready), vec![0]);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 2, "0.sqlite and its WAL");
        assert_eq!(s.next.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn only_whole_spares_outlive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s = spares(dir.path(), 4);
        for _ in 0..4 {
            s.make_one().unwrap();
        }
        let d = s.dir.clone();
        drop(s);
        // 0 whole; 1 half taken (its WAL gone); 2 with a WAL that was written; 3 also an
        // agent's file (a lost removal); and a copy that was being made.
        fs::remove_file(wal_path(&spare_path(&d, 1))).unwrap();
        fs::write(wal_path(&spare_path(&d, 2)), b"frames").unwrap();
        fs::hard_link(spare_path(&d, 3), dir.path().join("agent.sqlite")).unwrap();
        fs::write(d.join("4.sqlite-new"), b"half").unwrap();
        let s = spares(dir.path(), 4);
        assert_eq!(*lock(&s.ready), vec![0]);
        let mut left: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["0.sqlite", "0.sqlite-wal"]);
        assert!(
            dir.path().join("agent.sqlite").exists(),
            "the agent's name stays"
        );
        assert_eq!(s.next.load(Ordering::Relaxed), 1);
    }
}
