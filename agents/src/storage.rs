//! Per-agent SQLite files: opening them, the typed key-value store and schema migrations.
//!
//! Each agent owns one database in WAL mode at `<data_dir>/agents/<id[..2]>/<id>.sqlite`.
//! Tables whose names start with `_agents_` belong to the runtime; every other table is the
//! agent's own.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use rusqlite::{
    hooks::{AuthAction, AuthContext, Authorization},
    params, Connection, OptionalExtension,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::{address::AgentKey, error::Error, spares::Spares};

/// How durable a reply is when the caller receives it.
///
/// Either way SQLite itself commits without syncing; the runtime adds the syncs that each
/// setting promises, off the async workers:
/// - commits append to the write-ahead log (WAL) and become visible at once;
/// - under `Full`, a per-agent syncer `fdatasync`s the WAL and only then releases the replies
///   of every commit it covers (group commit: one sync serves every batch committed meanwhile,
///   and the agent goes on working while it runs); a commit that has nothing to release and
///   holds only the runtime's own bookkeeping (a socket's close whose `on_error` and `on_close`
///   changed no row) starts no sync: the next one covers it, at the latest when the agent
///   hibernates (lost in a crash before, the stale connection row is removed at the next open);
///   a commit that wrote nothing (calls that only read) has nothing to sync: its replies wait
///   only for the syncs of the writes before it, and leave at once if there are none;
/// - checkpoints (copying the WAL into the database) are run by the runtime with SQLite's
///   `synchronous=FULL`, so the database file is synced before the WAL is ever reused; under
///   `Full` the WAL is not synced again first, its frames being durable already (on Linux,
///   where the runtime's own SQLite VFS opens it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// A reply is released only after its writes are fsynced: it survives a process crash
    /// *and* a power loss. The default.
    #[default]
    Full,
    /// A reply is released as soon as its writes reach the operating system: it survives a
    /// crash of the process, but the last commits can be lost if the machine loses power.
    /// Much cheaper per commit.
    Normal,
}

/// The version of the runtime's own tables, kept in the database header (`application_id`).
///
/// 4: durable values (kv, connection state, shared state, schedule arguments) are written as
/// JSON text; the postcard blobs of earlier versions stay readable (see [`Stored`]); connections
/// record their protocol.
const RUNTIME_SCHEMA: i64 = 0x4167_0004;

/// Checkpoint once the WAL is larger than this (see [`checkpoint_wal_bytes`]).
const CHECKPOINT_WAL_BYTES: u64 = 8 << 20;

/// Under `Durability::Full`, checkpoint once the WAL is larger than this. The WAL then starts
/// over from its first frame, in the same file: commits overwrite blocks already written, and
/// the fdatasync of each costs less than one that makes the file longer (~130 µs against
/// ~200 µs on the development machine).
const SYNCED_CHECKPOINT_WAL_BYTES: u64 = 1 << 20;

/// How large the WAL grows before a checkpoint: small under `Durability::Full`, whose commits
/// then mostly overwrite (see [`SYNCED_CHECKPOINT_WAL_BYTES`]); larger under `Normal`, whose
/// commits are not synced anyway, and if the database is `replicated` (cluster mode), where
/// every checkpoint stores a snapshot of it.
pub(crate) fn checkpoint_wal_bytes(durability: Durability, replicated: bool) -> u64 {
    match durability {
        Durability::Full if !replicated => SYNCED_CHECKPOINT_WAL_BYTES,
        _ => CHECKPOINT_WAL_BYTES,
    }
}

/// The columns that runtime schema 4 added to tables that existed before it.
const ADDED_IN_4: &[(&str, &str)] = &[
    ("_agents_connections", "protocol"),
    ("_agents_schedules", "target_class"),
    ("_agents_schedules", "target_name"),
    ("_agents_dead_letters", "target_class"),
    ("_agents_dead_letters", "target_name"),
];

/// Adds to the runtime's tables of an older database the columns it lacks (all TEXT, NULL for
/// the rows there are).
fn upgrade(conn: &Connection) -> Result<(), Error> {
    for (table, column) in ADDED_IN_4 {
        let has: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} TEXT"))?;
        }
    }
    Ok(())
}

/// Where the database of `key` lives under `data_dir`.
pub(crate) fn db_path(data_dir: &Path, key: &AgentKey) -> PathBuf {
    let id = key.id();
    data_dir
        .join("agents")
        .join(&id[..2])
        .join(format!("{id}.sqlite"))
}

/// Makes the agents' directories (`agents/00` to `agents/ff`, by the first byte of an agent's
/// id) if they are missing, and syncs their parents once (under `Durability::Full`): an
/// agent's first file never waits for a new directory's entry to be synced. Blocking.
pub(crate) fn make_dirs(data_dir: &Path, durability: Durability) -> Result<(), Error> {
    let agents = data_dir.join("agents");
    // Made last: when it is there, so are the others (and `open` makes any that went).
    if agents.join("ff").is_dir() {
        return Ok(());
    }
    for byte in 0..=u8::MAX {
        let dir = agents.join(format!("{byte:02x}"));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
    }
    if durability == Durability::Full {
        for dir in [agents.as_path(), data_dir] {
            sync_path(dir)?;
        }
    }
    Ok(())
}

/// Fsyncs the file or directory at `path` (a directory: the entries made or removed in it
/// become durable). Blocking.
pub(crate) fn sync_path(path: &Path) -> Result<(), Error> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Makes an i/o error on `path` an [`Error::Io`].
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Sets SQLite up for the runtime, once per process, before it opens any database: no memory
/// statistics, which SQLite otherwise keeps under one process-wide mutex taken by every
/// allocation of every connection (with no lookaside, see [`no_lookaside`], that is most of
/// what a statement allocates: 12.8 % of `perf`'s samples of the pipelined network bench went
/// to taking and leaving it, 5.5 % after). Nothing here reads those statistics. Too late once
/// SQLite was initialized (by the application's own use of SQLite before the runtime started):
/// then it stays as is.
pub(crate) fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one `int`; sqlite3_config is safe to call
        // before sqlite3_initialize and returns SQLITE_MISUSE after it.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!("SQLite keeps its memory statistics (it said {rc})");
        }
    });
}

/// Turns off SQLite's lookaside for `conn` (its per-connection pool for small allocations):
/// by default 100 slots of 1,200 bytes, set up (and so touched) when the connection opens,
/// it is about 48 KB of each live agent's memory, more than a small agent's data. Small
/// allocations then come from the allocator (a few % of CPU in the core bench's in-memory
/// paths). Called before any statement runs, while no lookaside memory is in use.
fn no_lookaside(conn: &Connection) {
    // SAFETY: the handle is `conn`'s own and open; SQLITE_DBCONFIG_LOOKASIDE takes a buffer
    // pointer (null: none), a slot size and a slot count (zero: no lookaside).
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0 as std::ffi::c_int,
            0 as std::ffi::c_int,
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::debug!("the lookaside stays as it was (SQLite said {rc})");
    }
}

/// Makes SQLite keep the WAL file when the connection closes, emptied, instead of removing it:
/// the next open (every wake after a hibernation) finds it, so it neither makes a file (a new
/// inode, and a directory entry to sync before its first reply) nor removes one at each
/// hibernation. A database whose WAL is kept reads as before in any SQLite (an empty WAL is no
/// WAL), and one without a WAL gets one at its next open.
fn keep_wal(conn: &Connection) {
    let mut keep: std::ffi::c_int = 1;
    // SAFETY: the handle is `conn`'s own and open; SQLITE_FCNTL_PERSIST_WAL reads (and writes
    // back) the `int` its argument points to, which outlives the call.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&raw mut keep).cast(),
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::debug!("the WAL goes at each close (SQLite said {rc})");
    }
}

/// Opens `path` for the runtime alone (Linux): without SQLite's own POSIX file locks (the
/// `agents` VFS: `unix-none` with a WAL index in memory, see [`crate::vfs`]), as those keep a
/// process-wide list of open files that every open walks: with thousands of live agents, most of
/// an activation's CPU. Other processes are kept out by the lock SQLite itself checks, taken
/// here: an open-file-description lock on SQLite's lock bytes, which conflicts with the lock any
/// other SQLite takes to read or write the file (in this process too). The returned file holds
/// it: keep it as long as the connection. Elsewhere, SQLite's own locks. The `bool` says whether
/// the connection needs SQLite's exclusive locking mode for WAL (it has no WAL index of ours).
#[cfg(target_os = "linux")]
fn open_unlocked(
    path: &Path,
    key: &AgentKey,
) -> Result<(Connection, Option<fs::File>, bool), Error> {
    use std::os::fd::AsRawFd;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    // SAFETY: an all-zero `flock` is a valid value; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as _;
    lock.l_whence = libc::SEEK_SET as _;
    // SQLite's PENDING_BYTE, then its RESERVED byte and its 510 SHARED bytes.
    lock.l_start = 0x4000_0000;
    lock.l_len = 512;
    // SAFETY: `file` is open, and F_OFD_SETLK only reads the `flock` it is given.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == -1 {
        // Held: by the instance before this one, still closing the file (a hand-over), or by
        // another process. The caller waits, without holding anything others need (see
        // `is_busy`).
        let e = std::io::Error::last_os_error();
        return Err(Error::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                e.kind(),
                format!("the database of {key} is open in another process ({e})"),
            ),
        });
    }
    let flags = rusqlite::OpenFlags::default();
    let ours = crate::vfs::register();
    let vfs = if ours { crate::vfs::NAME } else { c"unix-none" };
    let conn = Connection::open_with_flags_and_vfs(path, flags, vfs)?;
    Ok((conn, Some(file), !ours))
}

#[cfg(not(target_os = "linux"))]
fn open_unlocked(path: &Path, _: &AgentKey) -> Result<(Connection, Option<fs::File>, bool), Error> {
    Ok((Connection::open(path)?, None, true))
}

/// Whether opening failed because another holder has the database's lock: worth trying again
/// in a moment.
pub(crate) fn is_busy(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock)
}

/// How an agent's database is locked while it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Locking {
    /// SQLite's exclusive locking mode: nobody else reads the file while the agent is live.
    #[default]
    Exclusive,
    /// SQLite's normal locking: other processes may read the file meanwhile.
    Shared,
}

/// The data dir's lock file: held (an advisory lock of the operating system) by the runtime that
/// serves the data dir, so that no second runtime opens the same databases.
pub(crate) const LOCK_FILE: &str = "agents.lock";

/// Who holds the data dir's lock, as its lock file (`file`) says (`pid 123`; empty if it says
/// nothing).
pub(crate) fn holder(file: &mut fs::File) -> String {
    use std::io::Read;
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    holder.trim().to_owned()
}

/// Takes the lock of `data_dir` for this runtime (see [`LOCK_FILE`]); it is released when the
/// file is dropped, or when the process ends however it ends.
pub(crate) fn lock_data_dir(data_dir: &Path) -> Result<fs::File, Error> {
    use std::io::{Seek, Write};
    let path = data_dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = holder(&mut file);
            return Err(Error::DataDirInUse {
                path: data_dir.to_owned(),
                holder: if holder.is_empty() {
                    String::new()
                } else {
                    format!(" ({holder})")
                },
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    // Say who holds it, for the error another runtime gets.
    let said = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| write!(file, "pid {}", std::process::id()));
    said.map_err(io(&path))?;
    Ok(file)
}

/// Makes the database of `key` if it has none, from one of `spares` if one is ready, or else
/// from the template; whether it did. Its bytes are synced (under `Durability::Full`), its
/// directory entry is not: that waits for the first sync of its WAL (see
/// [`Opened::dir_unsynced`]). Blocking: call it off the async workers; it mostly waits for the
/// disk, so it needs no `opening` permit.
pub(crate) fn create(
    data_dir: &Path,
    key: &AgentKey,
    durability: Durability,
    spares: Option<&Spares>,
) -> Result<bool, Error> {
    let path = db_path(data_dir, key);
    if path.exists() {
        return Ok(false);
    }
    let dir = path.parent().expect("db_path has a parent");
    if !dir.exists() {
        // Gone since `make_dirs`: made again, its own entry synced now (rare).
        fs::create_dir_all(dir).map_err(io(dir))?;
        if durability == Durability::Full {
            sync_path(dir.parent().expect("agents dir"))?;
        }
    }
    let taken = match spares {
        Some(spares) => spares.take(&path)?,
        None => false,
    };
    if !taken {
        from_template(data_dir, &path, durability)?;
    }
    Ok(true)
}

/// Opens the database of `key`, and its WAL file for the syncer; `None` if it has none yet
/// (see [`create`]). Blocking: call it off the async workers.
pub(crate) fn open(
    data_dir: &Path,
    key: &AgentKey,
    durability: Durability,
    locking: Locking,
) -> Result<Option<Opened>, Error> {
    let path = db_path(data_dir, key);
    if !path.exists() {
        return Ok(None);
    }
    let wal_path = wal_path(&path);
    // A database without a WAL was last closed by an older runtime, which removed it (see
    // `keep_wal`), or is new from the template: the entry of the WAL that SQLite is about to
    // make is not durable until their directory is synced (nor, if new, the database's: see
    // `created` below).
    let no_wal = !wal_path.exists();
    let (conn, guard, exclusive) = match locking {
        Locking::Exclusive => open_unlocked(&path, key)?,
        Locking::Shared => (Connection::open(&path)?, None, false),
    };
    no_lookaside(&conn);
    keep_wal(&conn);
    if exclusive {
        // Only this runtime opens the file (it holds the data dir's lock, see `lock_data_dir`):
        // in exclusive locking mode SQLite takes the file lock once, at the first transaction,
        // and keeps the WAL index on its heap: no lock calls per transaction, no `-shm` file.
        // (The `agents` VFS does the same with less memory, and needs none of this.)
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    }
    // Durability is the runtime's business (see `Durability`): no syncs inside SQLite's commits,
    // no automatic checkpoints.
    conn.pragma_update(None, "synchronous", "OFF")?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // A WAL that one large transaction made longer is cut back when it starts over.
    let limit = checkpoint_wal_bytes(durability, false);
    conn.pragma_update(None, "journal_size_limit", limit)?;
    conn.wal_hook(Some(record_wal_frames));
    conn.set_prepared_statement_cache_capacity(64);
    // The runtime's tables: the header's application_id records their version, so reopening a
    // database (after every hibernation) costs one pragma, not the DDL. A new file is a copy of
    // the template, which has them.
    let schema: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    if schema != RUNTIME_SCHEMA {
        create_tables(&conn, schema)?;
    }
    // Record the address on first open, and check it on every later one: two addresses whose
    // ids collide must never share a file.
    let address = "SELECT (SELECT v FROM _agents_meta WHERE k = 'class'), (SELECT v FROM _agents_meta WHERE k = 'name'),
                EXISTS (SELECT 1 FROM _agents_meta WHERE k = 'destroyed')";
    let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(Option<String>, Option<String>, bool)> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    };
    let (class, name, destroyed, created) = match conn.query_row(address, [], read)? {
        (Some(class), Some(name), destroyed) => (class, name, destroyed, false),
        _ => {
            conn.execute(
                "INSERT OR IGNORE INTO _agents_meta(k, v) VALUES ('class', ?1), ('name', ?2)",
                [key.class(), key.name()],
            )?;
            (key.class().to_owned(), key.name().to_owned(), false, true)
        }
    };
    if destroyed && class == key.class() && name == key.name() {
        // Destroyed, and the process stopped before the files went: finish the job.
        drop(conn);
        drop(guard);
        remove(data_dir, key)?;
        create(data_dir, key, durability, None)?;
        return open(data_dir, key, durability, locking);
    }
    if class != key.class() || name != key.name() {
        return Err(Error::InvalidAddress(format!(
            "{} belongs to {class}/{name}, not to {key}",
            path.display()
        )));
    }
    // A file without an address is new (from the template or a spare, which has a WAL): its
    // entries may not be durable yet.
    let dir_unsynced = durability == Durability::Full && (no_wal || created);
    // The handle the gate syncs the WAL through: only durability that syncs needs it.
    let wal = match durability {
        Durability::Full => {
            let opened = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&wal_path);
            Some(opened.map_err(io(&wal_path))?)
        }
        Durability::Normal => None,
    };
    // What opening read (the schema, the address) need not stay cached: a small agent's cache
    // holds only what its events read.
    conn.flush_prepared_statement_cache();
    if let Err(e) = conn.release_memory() {
        tracing::debug!("releasing SQLite's memory: {e}");
    }
    Ok(Some(Opened {
        conn,
        wal,
        dir_unsynced,
        guard,
        created,
        path,
    }))
}

/// An agent's open database.
pub(crate) struct Opened {
    pub conn: Connection,
    /// Its WAL file, for the gate to sync (`Durability::Full`; `None` otherwise: one descriptor
    /// fewer).
    pub wal: Option<fs::File>,
    /// Its directory holds entries not durable yet (a new database's, a new WAL's: see
    /// [`open`]), to be synced after the WAL's first sync, before any reply that needs them
    /// (`Durability::Full`; the bytes are durable by then: the database's since `create`, the
    /// WAL's by that sync).
    pub dir_unsynced: bool,
    /// What keeps other processes out (see `open_unlocked`): drop it after the connection.
    pub guard: Option<fs::File>,
    /// Whether the agent is new: this open recorded the file's address (every open does, so a
    /// file without one holds nothing: `create` made it, for this activation or for one
    /// stopped before its open).
    pub created: bool,
    /// The database's path.
    pub path: PathBuf,
}

/// Creates the runtime's tables in `conn`, a new file or one of an older runtime `schema` (which
/// gets what it lacks), and records their version.
fn create_tables(conn: &Connection, schema: i64) -> Result<(), Error> {
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS _agents_meta(k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS _agents_kv(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
    )?;
    conn.execute_batch(crate::schedule::TABLES)?;
    conn.execute_batch(crate::conn::TABLES)?;
    if schema != 0 {
        upgrade(conn)?;
    }
    conn.pragma_update(None, "application_id", RUNTIME_SCHEMA)?;
    conn.execute_batch("COMMIT")?;
    Ok(())
}

/// Where new databases are copied from: a file with the runtime's tables and nothing else
/// (in WAL mode, checkpointed), one per runtime schema, made when first needed.
fn template_path(data_dir: &Path) -> PathBuf {
    data_dir
        .join("agents")
        .join(format!(".template-{RUNTIME_SCHEMA:x}.sqlite"))
}

/// Creates the database file `path` as a copy of the template: a copy of a few pages instead
/// of parsing and writing the runtime's tables for every new agent. The copy is made under
/// another name and renamed into place (synced first under `Durability::Full`), so a crash never
/// leaves half a file under an agent's name.
pub(crate) fn from_template(
    data_dir: &Path,
    path: &Path,
    durability: Durability,
) -> Result<(), Error> {
    let template = template_path(data_dir);
    let copy = path.with_extension("sqlite-new");
    let sync = durability == Durability::Full;
    // Made when the first copy finds none (not looked for before every copy).
    if let Err(e) = copy_file(&template, &copy, sync) {
        if e.kind() != std::io::ErrorKind::NotFound || template.exists() {
            return Err(io(&copy)(e));
        }
        // One maker at a time in this process: the activations that find none at once (the
        // first burst on a new data dir) wait for it rather than each making one.
        static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let making = crate::lock::lock(&MAKING);
        if !template.exists() {
            make_template(&template)?;
        }
        drop(making);
        copy_file(&template, &copy, sync).map_err(io(&copy))?;
    }
    fs::rename(&copy, path).map_err(io(path))
}

/// Copies `from` to a new file `to` (its data synced if `sync`), through one handle of each.
fn copy_file(from: &Path, to: &Path, sync: bool) -> std::io::Result<()> {
    let mut source = fs::File::open(from)?;
    let mut copy = fs::File::create(to)?;
    std::io::copy(&mut source, &mut copy)?;
    if sync {
        copy.sync_data()?;
    }
    Ok(())
}

/// Makes the template (see [`template_path`]) under a name of its own, then renames it into
/// place: runtimes making it at once each make a whole one.
fn make_template(template: &Path) -> Result<(), Error> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let making = template.with_extension(format!("making-{}-{n}", std::process::id()));
    let conn = Connection::open(&making)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    create_tables(&conn, 0)?;
    // Closing the last connection checkpoints the WAL into the file and removes it.
    conn.close().map_err(|(_, e)| Error::Storage(e))?;
    sync_path(&making)?;
    fs::rename(&making, template).map_err(io(template))
}

/// The prefix of the runtime's savepoints (`agents_event` around each event, `agents_row`
/// around each scheduled row).
pub(crate) const RUNTIME_SAVEPOINTS: &str = "agents_";

/// While `in_handler` is set, refuses the statements that would take the transaction away from
/// the runtime: `BEGIN`, `COMMIT`, `END`, `ROLLBACK`, and any use of the runtime's savepoints
/// (named `agents_*`).
/// (A handler's own savepoints are fine.) SQLite reports the refusal as "not authorized".
pub(crate) fn guard_transaction(conn: &Connection, in_handler: Arc<AtomicBool>) {
    conn.authorizer(Some(move |ctx: AuthContext<'_>| {
        if !in_handler.load(Ordering::Relaxed) {
            return Authorization::Allow;
        }
        match ctx.action {
            AuthAction::Transaction { .. } => Authorization::Deny,
            AuthAction::Savepoint { savepoint_name, .. }
                if savepoint_name
                    .get(..RUNTIME_SAVEPOINTS.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(RUNTIME_SAVEPOINTS)) =>
            {
                Authorization::Deny
            }
            _ => Authorization::Allow,
        }
    }));
}

/// Marks the database as destroyed, in the current transaction: once that commits, the agent
/// is gone even if the process stops before its files are (the next open finishes the job).
pub(crate) fn mark_destroyed(conn: &Connection) -> Result<(), Error> {
    conn.prepare_cached("INSERT OR REPLACE INTO _agents_meta(k, v) VALUES ('destroyed', '1')")?
        .execute([])?;
    Ok(())
}

/// Deletes the (closed) database of `key` and its WAL and shared-memory files, and syncs the
/// directory. Blocking.
pub(crate) fn remove(data_dir: &Path, key: &AgentKey) -> Result<(), Error> {
    let path = db_path(data_dir, key);
    for file in [
        wal_path(&path),
        path.with_extension("sqlite-shm"),
        path.clone(),
    ] {
        remove_file(&file)?;
    }
    sync_path(path.parent().expect("db_path has a parent"))
}

/// Deletes the file at `path`, if there is one. Blocking.
pub(crate) fn remove_file(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// The WAL of the database at `db`.
pub(crate) fn wal_path(db: &Path) -> PathBuf {
    db.with_extension("sqlite-wal")
}

/// Runs blocking storage work (file I/O, fsync) off the async workers; a panic in it becomes
/// an error.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(Error::Internal(format!(
            "a blocking storage task failed: {e}"
        )))
    })
}

thread_local! {
    /// How many frames the WAL held after the last commit made on this thread: SQLite's WAL
    /// hook runs inside the commit, on the committing thread (no file is asked).
    static WAL_FRAMES: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

fn record_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(u32::try_from(frames).ok());
    Ok(())
}

/// Commits the open transaction (rolled back if the commit fails), and says how many frames
/// the WAL holds after it (`None`: the transaction wrote nothing). SQLite does not sync here
/// (see `Durability`): this is a write into the WAL.
pub(crate) fn commit(conn: &Connection) -> Result<Option<u32>, Error> {
    WAL_FRAMES.set(None);
    let result = conn
        .prepare_cached("COMMIT")
        .and_then(|mut s| s.execute([]));
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result?;
    Ok(WAL_FRAMES.take())
}

/// How many WAL frames hold `bytes` of a database with pages of `page_size` bytes.
pub(crate) fn wal_frames_for(bytes: u64, page_size: u64) -> u32 {
    // A frame is a 24-byte header and a page.
    u32::try_from(bytes / (page_size + 24)).unwrap_or(u32::MAX)
}

/// Copies the WAL into the database, syncing both (the WAL first: a crash while pages are
/// copied finds them there again; then the database, before the frames count as copied). The
/// next write starts the WAL over from its first frame, in the file as it is, or, if
/// `truncate`, in a file emptied now. If `durable_wal` (every frame of the WAL is durable
/// already: see `CommitGate::wal_is_durable`), the WAL is not synced again (see
/// [`crate::vfs::with_durable_wal`]). Blocking.
pub(crate) fn checkpoint(
    conn: &Connection,
    truncate: bool,
    durable_wal: bool,
) -> Result<(), Error> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    let checkpoint = if truncate {
        "PRAGMA wal_checkpoint(TRUNCATE)"
    } else {
        "PRAGMA wal_checkpoint(RESTART)"
    };
    let result = with_durable_wal(durable_wal, || conn.query_row(checkpoint, [], |_| Ok(())));
    conn.pragma_update(None, "synchronous", "OFF")?;
    Ok(result?)
}

/// Closes the database; the final checkpoint syncs the database before the WAL is emptied (it
/// stays, see `keep_wal`), and the WAL first unless `durable_wal` (see [`checkpoint`]).
/// Blocking.
pub(crate) fn close(conn: Connection, durable_wal: bool) -> Result<(), Error> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    with_durable_wal(durable_wal, || {
        conn.close().map_err(|(_, e)| Error::Storage(e))
    })
}

#[cfg(target_os = "linux")]
use crate::vfs::with_durable_wal;

/// Elsewhere the `agents` VFS is not there: SQLite syncs the WAL as usual.
#[cfg(not(target_os = "linux"))]
fn with_durable_wal<T>(_: bool, f: impl FnOnce() -> T) -> T {
    f()
}

/// A typed key-value store in the agent's database (`ctx.kv()`).
///
/// Values are stored as JSON text (readable with the `sqlite3` shell once the agent hibernates,
/// see [`Builder::readable_while_live`](crate::Builder::readable_while_live):
/// `SELECT k, v FROM _agents_kv`), so they evolve as serde allows: a field added with
/// `#[serde(default)]` or removed, `serde_json::Value`, tagged and untagged enums all read back
/// after a deploy. Writes are part of the current event's transaction, like any other SQL.
pub struct Kv<'a> {
    conn: &'a Connection,
}

impl<'a> Kv<'a> {
    pub(crate) fn new(conn: &'a Connection) -> Self {
        Kv { conn }
    }

    /// The value at `key`, if there is one.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT v FROM _agents_kv WHERE k = ?1")?;
        let stored: Option<Stored> = stmt.query_row([key.as_bytes()], |r| r.get(0)).optional()?;
        stored.map(|v| v.decode(&format!("kv `{key}`"))).transpose()
    }

    /// Stores `value` at `key`, replacing what was there.
    pub fn put<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), Error> {
        let stored = Stored::encode(value, &format!("kv `{key}`"))?;
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO _agents_kv(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        )?;
        stmt.execute(params![key.as_bytes(), stored])?;
        Ok(())
    }

    /// Removes `key`; `true` if it was there.
    pub fn delete(&self, key: &str) -> Result<bool, Error> {
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM _agents_kv WHERE k = ?1")?;
        Ok(stmt.execute([key.as_bytes()])? > 0)
    }

    /// Every entry whose key starts with `prefix`, in key order (byte-wise).
    pub fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>, Error> {
        let lower = prefix.as_bytes();
        let upper = prefix_upper_bound(lower);
        let mut stmt = self.conn.prepare_cached(
            "SELECT k, v FROM _agents_kv WHERE k >= ?1 AND (?2 IS NULL OR k < ?2) ORDER BY k",
        )?;
        let rows = stmt.query_map(params![lower, upper], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Stored>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (k, v) = row?;
            let k = String::from_utf8(k)
                .map_err(|e| Error::Codec(format!("kv key is not UTF-8: {e}")))?;
            let v = v.decode(&format!("kv `{k}`"))?;
            out.push((k, v));
        }
        Ok(out)
    }

    /// Removes every entry; returns how many there were.
    pub fn delete_all(&self) -> Result<usize, Error> {
        Ok(self.conn.execute("DELETE FROM _agents_kv", [])?)
    }
}

/// A durable value as a column holds it: JSON text, or (written before runtime schema 4)
/// postcard bytes. SQLite's storage class tells them apart, so old rows need no conversion
/// (postcard is not self-describing: only the type that reads a row can decode it) and are
/// rewritten as JSON when next written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Stored {
    Json(String),
    Postcard(Vec<u8>),
}

impl Stored {
    /// `value` as JSON; `what` names it in errors.
    pub fn encode<T: Serialize + ?Sized>(value: &T, what: &str) -> Result<Self, Error> {
        serde_json::to_string(value)
            .map(Stored::Json)
            .map_err(|e| Error::Codec(format!("{what} could not be stored: {e}")))
    }

    /// The value as a `T`; `what` names it in errors.
    pub fn decode<T: DeserializeOwned>(&self, what: &str) -> Result<T, Error> {
        let decoded = match self {
            Stored::Json(text) => serde_json::from_str(text).map_err(|e| e.to_string()),
            Stored::Postcard(bytes) => postcard::from_bytes(bytes).map_err(|e| e.to_string()),
        };
        decoded
            .map_err(|e| Error::Codec(format!("{what} does not decode as the requested type: {e}")))
    }
}

impl rusqlite::types::ToSql for Stored {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Stored::Json(text) => text.to_sql(),
            Stored::Postcard(bytes) => bytes.to_sql(),
        }
    }
}

impl rusqlite::types::FromSql for Stored {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        match value {
            rusqlite::types::ValueRef::Blob(bytes) => Ok(Stored::Postcard(bytes.to_vec())),
            other => String::column_result(other).map(Stored::Json),
        }
    }
}

/// The smallest byte string greater than every string starting with `prefix`, if any.
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xff {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

/// Applies the migrations the database has not seen yet, keyed by `PRAGMA user_version`:
/// a database at version `v` runs `migrations[v..]` in order and ends at `migrations.len()`.
pub(crate) fn migrate(conn: &Connection, migrations: &[&str]) -> Result<(), Error> {
    let version: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if version > migrations.len() {
        return Err(Error::Migration(format!(
            "the database is at schema version {version}, but only {} migrations are known (was it written by newer code?)",
            migrations.len()
        )));
    }
    for (i, sql) in migrations.iter().enumerate().skip(version) {
        conn.execute_batch(sql)
            .map_err(|e| Error::Migration(format!("migration {} failed: {e}", i + 1)))?;
    }
    if version < migrations.len() {
        conn.pragma_update(None, "user_version", migrations.len() as i64)?;
    }
    Ok(())
}

/// Opens `key`'s database in `dir` as the runtime does, made first if it has none (tests).
#[cfg(test)]
pub(crate) fn opened(dir: &Path, key: &AgentKey, durability: Durability) -> Result<Opened, Error> {
    create(dir, key, durability, None)?;
    Ok(open(dir, key, durability, Locking::Exclusive)?.expect("made"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_from_a_spare_waits_for_its_directory_sync_too() {
        let dir = tempfile::tempdir().unwrap();
        make_dirs(dir.path(), Durability::Full).unwrap();
        let spares = Spares::open(dir.path(), Durability::Full, 1).unwrap();
        spares.make_one().unwrap();
        let key = AgentKey::new("t", "from-a-spare").unwrap();
        assert!(create(dir.path(), &key, Durability::Full, Some(&spares)).unwrap());
        assert_eq!(spares.ready(), 0, "taken");
        let path = db_path(dir.path(), &key);
        assert!(path.with_extension("sqlite-wal").exists(), "with its WAL");
        let new = open(dir.path(), &key, Durability::Full, Locking::Exclusive)
            .unwrap()
            .unwrap();
        // Its WAL is there, but neither entry is durable: the first sync syncs the directory.
        assert!(new.created && new.dir_unsynced);
        new.conn.execute_batch("CREATE TABLE t(x)").unwrap();
        close(new.conn, false).unwrap();
        drop(new.guard);
        let again = open(dir.path(), &key, Durability::Full, Locking::Exclusive)
            .unwrap()
            .unwrap();
        assert!(!again.created && !again.dir_unsynced);
    }

    #[test]
    fn new_entries_wait_for_the_first_sync_and_a_close_keeps_the_wal_empty() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "wal-new").unwrap();
        let reopen = || opened(dir.path(), &key, Durability::Full).unwrap();
        // None until made (without an `opening` permit); then new, and its directory is left
        // for the first sync (the open syncs nothing).
        let open_full = || open(dir.path(), &key, Durability::Full, Locking::Exclusive).unwrap();
        assert!(open_full().is_none(), "no file yet");
        assert!(create(dir.path(), &key, Durability::Full, None).unwrap());
        assert!(
            !create(dir.path(), &key, Durability::Full, None).unwrap(),
            "made once"
        );
        let first = open_full().unwrap();
        assert!(first.created && first.dir_unsynced);
        first.conn.execute_batch("CREATE TABLE t(x)").unwrap();
        close(first.conn, false).unwrap();
        drop(first.guard);
        let wal = first.path.with_extension("sqlite-wal");
        let kept = fs::metadata(&wal).expect("a close keeps the WAL");
        assert_eq!(kept.len(), 0, "checkpointed and emptied");
        let kept = reopen();
        assert!(!kept.created && !kept.dir_unsynced, "nothing new");
        close(kept.conn, false).unwrap();
        drop(kept.guard);
        // Closed by a runtime that removed the WAL at each close: the open makes one.
        fs::remove_file(&wal).unwrap();
        let normal = opened(dir.path(), &key, Durability::Normal).unwrap();
        assert!(!normal.dir_unsynced, "Normal syncs no directory");
        close(normal.conn, false).unwrap();
        drop(normal.guard);
        fs::remove_file(&wal).unwrap();
        let again = reopen();
        assert!(
            !again.created && again.dir_unsynced,
            "its entry waits for its first sync"
        );
        again
            .conn
            .execute_batch("INSERT INTO t VALUES (1)")
            .unwrap();
        std::mem::forget(again.conn); // a crash: the WAL stays
        drop(again.guard);
        let after = reopen();
        assert!(!after.dir_unsynced);
        let n: i64 = after
            .conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn a_commit_says_how_far_the_wal_reaches_and_a_checkpoint_starts_it_over() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "wal").unwrap();
        let Opened { conn, wal, .. } = opened(dir.path(), &key, Durability::Full).unwrap();
        let wal = wal.expect("Full syncs the WAL through a handle of its own");
        conn.execute_batch("CREATE TABLE t(x)").unwrap();
        let write = |n: i64| {
            conn.execute_batch("BEGIN").unwrap();
            conn.execute("INSERT INTO t VALUES (?1)", [n]).unwrap();
            commit(&conn).unwrap()
        };
        let first = write(1).expect("a write appends frames");
        let second = write(2).expect("a write appends frames");
        assert!(second > first, "{first} then {second}");
        // The frames are what the file holds: a 32-byte header, then 24 + page bytes a frame.
        let page: u64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            wal.metadata().unwrap().len(),
            32 + u64::from(second) * (24 + page)
        );
        assert_eq!(
            wal_frames_for(32 + u64::from(second) * (24 + page), page),
            second
        );
        // A transaction that writes nothing appends nothing.
        conn.execute_batch("BEGIN").unwrap();
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap();
        assert_eq!(commit(&conn).unwrap(), None);
        // After a checkpoint the WAL starts again from its first frame: in the same file...
        let size = wal.metadata().unwrap().len();
        checkpoint(&conn, false, false).unwrap();
        let again = write(3).unwrap();
        assert!(
            again < second,
            "{again} frames after the checkpoint, {second} before"
        );
        assert_eq!(wal.metadata().unwrap().len(), size, "frames overwritten");
        // ... or in one emptied at the checkpoint.
        checkpoint(&conn, true, false).unwrap();
        assert_eq!(wal.metadata().unwrap().len(), 0);
        assert_eq!(write(4), Some(again));
        let count: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 4);
    }

    #[test]
    fn a_checkpoint_of_a_durable_wal_copies_it_all_and_starts_it_over() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "durable-wal").unwrap();
        let Opened { conn, wal, .. } = opened(dir.path(), &key, Durability::Full).unwrap();
        let wal = wal.unwrap();
        conn.execute_batch("CREATE TABLE t(x)").unwrap();
        let write = |n: i64| {
            conn.execute_batch("BEGIN").unwrap();
            conn.execute("INSERT INTO t VALUES (?1)", [n]).unwrap();
            commit(&conn).unwrap().unwrap()
        };
        let before = (1..=3).map(write).last().unwrap();
        checkpoint(&conn, false, true).unwrap();
        assert!(write(4) < before, "the WAL starts over");
        checkpoint(&conn, true, true).unwrap();
        assert_eq!(wal.metadata().unwrap().len(), 0, "emptied");
        write(5);
        close(conn, true).unwrap();
        assert_eq!(wal.metadata().unwrap().len(), 0, "emptied at the close");
        // All of it is in the database's file.
        let again = opened(dir.path(), &key, Durability::Full).unwrap();
        let rows: i64 = again
            .conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 5);
    }

    #[test]
    fn kv_round_trips_and_lists_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "x").unwrap();
        let conn = opened(dir.path(), &key, Durability::Normal).unwrap().conn;
        let kv = Kv::new(&conn);
        kv.put("a/1", &1u32).unwrap();
        kv.put("a/2", &2u32).unwrap();
        kv.put("a\u{ff}", &3u32).unwrap();
        kv.put("b", &4u32).unwrap();
        assert_eq!(kv.get::<u32>("a/2").unwrap(), Some(2));
        assert_eq!(kv.get::<u32>("zz").unwrap(), None);
        let listed: Vec<_> = kv.list::<u32>("a").unwrap();
        assert_eq!(
            listed.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(kv.list::<u32>("").unwrap().len(), 4);
        assert!(
            kv.get::<String>("a/1").is_err()
                || kv.get::<String>("a/1").unwrap() != Some("1".into())
        );
        assert!(kv.delete("a/1").unwrap());
        assert!(!kv.delete("a/1").unwrap());
        assert_eq!(kv.delete_all().unwrap(), 3);
        assert_eq!(prefix_upper_bound(&[0x61, 0xff]), Some(vec![0x62]));
        assert_eq!(prefix_upper_bound(&[0xff]), None);
    }

    #[test]
    fn migrations_run_once_and_refuse_downgrades() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "m").unwrap();
        let conn = opened(dir.path(), &key, Durability::Normal).unwrap().conn;
        let m = ["CREATE TABLE a(x)", "ALTER TABLE a ADD COLUMN y"];
        migrate(&conn, &m[..1]).unwrap();
        migrate(&conn, &m).unwrap();
        migrate(&conn, &m).unwrap();
        assert_eq!(
            conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            2
        );
        assert!(matches!(migrate(&conn, &m[..1]), Err(Error::Migration(_))));
    }

    #[test]
    fn a_file_of_runtime_schema_3_is_brought_up_to_date_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "old").unwrap();
        let path = db_path(dir.path(), &key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        {
            // The runtime's tables as schema 3 made them (c454cb6), with a row in each.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE _agents_meta(k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
                 CREATE TABLE _agents_kv(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
                 CREATE TABLE _agents_schedules(
                     id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE, method TEXT NOT NULL, args BLOB NOT NULL,
                     kind TEXT NOT NULL, spec TEXT, tz TEXT, next_ms INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                     created_ms INTEGER NOT NULL, last_error TEXT);
                 CREATE TABLE _agents_dead_letters(
                     id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, method TEXT NOT NULL, args BLOB NOT NULL,
                     kind TEXT NOT NULL, spec TEXT, tz TEXT, attempts INTEGER NOT NULL, error TEXT NOT NULL,
                     failed_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL);
                 CREATE TABLE _agents_connections(id TEXT PRIMARY KEY, principal TEXT, state BLOB) WITHOUT ROWID;
                 INSERT INTO _agents_meta VALUES ('class', 't'), ('name', 'old');
                 INSERT INTO _agents_schedules(method, args, kind, next_ms, created_ms) VALUES ('tick', x'', 'once', 5, 1);
                 INSERT INTO _agents_dead_letters(method, args, kind, attempts, error, failed_ms, created_ms)
                     VALUES ('gone', x'', 'once', 7, 'no', 3, 1);
                 INSERT INTO _agents_connections VALUES ('c1', 'ann', NULL);
                 PRAGMA application_id = 1097269251;", // 0x4167_0003
            )
            .unwrap();
        }
        let conn = opened(dir.path(), &key, Durability::Normal).unwrap().conn;
        let rows = crate::schedule::list(&conn).unwrap();
        assert_eq!(
            (rows[0].method.as_str(), rows[0].target.as_ref()),
            ("tick", None)
        );
        let dead = crate::schedule::dead_letters(&conn).unwrap();
        assert_eq!(
            (dead[0].method.as_str(), dead[0].target.as_ref()),
            ("gone", None)
        );
        let id = crate::conn::ConnId::new("c1".into());
        let old: crate::conn::Conn<()> = crate::conn::load(&conn, &id, &Default::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (old.principal(), old.protocol()),
            (Some("ann"), crate::conn::Protocol::Raw),
            "a connection from before records no protocol"
        );
        // New rows use the new columns.
        let new = crate::conn::ConnId::new("c2".into());
        crate::conn::insert(&conn, &new, crate::conn::Protocol::Json, None).unwrap();
        let new: crate::conn::Conn<()> = crate::conn::load(&conn, &new, &Default::default())
            .unwrap()
            .unwrap();
        assert_eq!(new.protocol(), crate::conn::Protocol::Json);
        let version: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, RUNTIME_SCHEMA);
    }

    #[test]
    fn the_agents_directories_are_made_once() {
        let dir = tempfile::tempdir().unwrap();
        make_dirs(dir.path(), Durability::Full).unwrap();
        let agents = dir.path().join("agents");
        let made = std::fs::read_dir(&agents).unwrap().count();
        assert_eq!(made, 256);
        // An agent's file goes into its own: no directory is made for it.
        let key = AgentKey::new("counter", "bob").unwrap();
        assert!(db_path(dir.path(), &key).parent().unwrap().is_dir());
        // Again: nothing to do (and one that went is made again when an agent needs it).
        std::fs::remove_dir(agents.join("00")).unwrap();
        make_dirs(dir.path(), Durability::Full).unwrap();
        assert_eq!(std::fs::read_dir(&agents).unwrap().count(), 255);
    }

    #[test]
    fn new_files_are_copies_of_the_template_and_a_torn_copy_is_no_harm() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "new").unwrap();
        // A copy a crash left half made, under the name copies are made under.
        let path = db_path(dir.path(), &key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path.with_extension("sqlite-new"), b"torn").unwrap();
        let conn = opened(dir.path(), &key, Durability::Full).unwrap().conn;
        assert!(template_path(dir.path()).exists());
        let (class, name, tables): (String, String, i64) = conn
            .query_row(
                "SELECT (SELECT v FROM _agents_meta WHERE k = 'class'),
                        (SELECT v FROM _agents_meta WHERE k = 'name'),
                        (SELECT count(*) FROM sqlite_schema WHERE name LIKE '\\_agents%' ESCAPE '\\')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((class.as_str(), name.as_str()), ("t", "new"));
        assert!(tables >= 5, "{tables} runtime tables");
        let schema: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .unwrap();
        assert_eq!(schema, RUNTIME_SCHEMA);
        assert!(!path.with_extension("sqlite-new").exists());
    }

    #[test]
    fn a_file_remembers_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "a\0b/../c").unwrap();
        close(
            opened(dir.path(), &key, Durability::Full).unwrap().conn,
            false,
        )
        .unwrap();
        let path = db_path(dir.path(), &key);
        assert!(path.starts_with(dir.path()) && path.exists());
        // Pretend another address hashed to the same file.
        let other = AgentKey::new("t", "other").unwrap();
        fs::create_dir_all(db_path(dir.path(), &other).parent().unwrap()).unwrap();
        fs::copy(&path, db_path(dir.path(), &other)).unwrap();
        assert!(matches!(
            opened(dir.path(), &other, Durability::Full),
            Err(Error::InvalidAddress(_))
        ));
    }
}
