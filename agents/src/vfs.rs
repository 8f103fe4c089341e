//! The SQLite VFS that agents' databases are opened with (Linux): SQLite's `unix-none` (no
//! file locks: see `storage::open_unlocked`) with a WAL index of its own, in anonymous memory
//! that only this process maps, instead of a `-shm` file.
//!
//! Without file locks, SQLite can run WAL only in its exclusive locking mode, where the WAL
//! index lives on SQLite's heap, allocated zeroed: 32 KiB for every open database, whatever
//! its size, a third of a small live agent's memory. Here each 32 KiB region of the index is
//! anonymous memory that is resident only where written (a small WAL writes two or three of its
//! eight pages), and goes back to a pool, its pages released, when the database closes. Locks
//! on the index are no-ops: a database is open once (the open-file-description lock that
//! `open_unlocked` takes keeps every other connection out, in this process too), so nothing
//! contends for them, and a transaction makes no system call for them either.
//!
//! Its WAL files sync as SQLite's do, except inside [`with_durable_wal`]: a checkpoint of a WAL
//! that the runtime has synced already does not sync it again.

use std::{
    ffi::{c_int, c_void, CStr},
    ptr,
    sync::{
        atomic::{fence, AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
};

use rusqlite::ffi;

use crate::lock::lock;

/// The VFS's name, for `Connection::open_with_flags_and_vfs`.
pub(crate) const NAME: &CStr = c"agents";

/// The size SQLite maps the WAL index in (`WALINDEX_PGSZ`); regions of other sizes are mapped
/// one by one.
const REGION: usize = 32 << 10;

/// How many regions one mapping of the pool holds (2 MiB: few mappings however many agents
/// are live).
const REGIONS_PER_MAPPING: usize = 64;

/// Registers the VFS (once); `false` if it could not be (then `unix-none` in exclusive locking
/// mode does instead).
pub(crate) fn register() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find initialises SQLite and returns a VFS that lives as long as
        // the process (built-in VFSes are never unregistered).
        let base = unsafe { ffi::sqlite3_vfs_find(c"unix-none".as_ptr()) };
        if base.is_null() {
            return false;
        }
        // SAFETY: `base` is a registered VFS, so a valid one.
        let mut vfs = unsafe { *base };
        let align = std::mem::align_of::<Ext>();
        let offset = (vfs.szOsFile as usize).div_ceil(align) * align;
        EXT_OFFSET.store(offset, Ordering::Relaxed);
        vfs.pNext = ptr::null_mut();
        vfs.zName = NAME.as_ptr();
        vfs.pAppData = base.cast();
        vfs.szOsFile = (offset + std::mem::size_of::<Ext>()) as c_int;
        vfs.xOpen = Some(open);
        // SQLite keeps the pointer: the VFS lives as long as the process.
        let vfs = Box::leak(Box::new(vfs));
        // SAFETY: `vfs` is a complete VFS (the base's, with our open) that is never freed.
        unsafe { ffi::sqlite3_vfs_register(vfs, 0) == ffi::SQLITE_OK }
    })
}

/// Where [`Ext`] starts in a file of ours: after the base VFS's file, aligned (set by
/// [`register`]).
static EXT_OFFSET: AtomicUsize = AtomicUsize::new(0);

/// What a main database file of ours has besides the base VFS's file: its WAL index.
struct Ext {
    /// The index's regions, in order, each `size` bytes.
    regions: Vec<*mut u8>,
    size: usize,
}

/// The methods of our main database files: the base VFS's, with a WAL index (made once, from
/// the methods of the first file opened).
static METHODS: OnceLock<Methods> = OnceLock::new();

/// `ffi::sqlite3_io_methods` holds raw pointers; the functions they point to are SQLite's and
/// ours, and live as long as the process.
struct Methods {
    ours: ffi::sqlite3_io_methods,
    base: *const ffi::sqlite3_io_methods,
}

// SAFETY: see `Methods`: immutable pointers to functions and to a static table.
unsafe impl Send for Methods {}
// SAFETY: as above.
unsafe impl Sync for Methods {}

/// The [`Ext`] of `file`.
///
/// # Safety
/// `file` is a main database file opened by [`open`], not yet closed.
unsafe fn ext<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Ext {
    &mut *file
        .cast::<u8>()
        .add(EXT_OFFSET.load(Ordering::Relaxed))
        .cast::<Ext>()
}

/// Opens `name` through the base VFS; a main database file gets a WAL index of ours.
unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // The base VFS, kept in ours.
    let base: *mut ffi::sqlite3_vfs = (*vfs).pAppData.cast();
    let Some(base_open) = (*base).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    let rc = base_open(base, name, file, flags, out_flags);
    if rc != ffi::SQLITE_OK || (*file).pMethods.is_null() {
        return rc;
    }
    if flags & ffi::SQLITE_OPEN_WAL != 0 {
        if let Some(ours) = ours(&WAL_METHODS, file, |m| m.xSync = Some(wal_sync)) {
            (*file).pMethods = ours;
        }
        return rc;
    }
    if flags & ffi::SQLITE_OPEN_MAIN_DB == 0 {
        return rc;
    }
    let Some(ours) = ours(&METHODS, file, |m| {
        m.iVersion = m.iVersion.max(2);
        m.xClose = Some(close);
        m.xShmMap = Some(shm_map);
        m.xShmLock = Some(shm_lock);
        m.xShmBarrier = Some(shm_barrier);
        m.xShmUnmap = Some(shm_unmap);
    }) else {
        // Not the methods ours were made from (the base VFS has one set for main files): left
        // as it is, without a WAL index, SQLite refuses WAL for it unless exclusive.
        return rc;
    };
    ptr::write(
        ext(file),
        Ext {
            regions: Vec::new(),
            size: 0,
        },
    );
    (*file).pMethods = ours;
    rc
}

/// Our methods for `file`, made once into `table` from its base VFS's by `change`; `None` if
/// `file` has other methods than those they were made from.
///
/// # Safety
/// `file` was just opened by the base VFS, with methods.
unsafe fn ours(
    table: &'static OnceLock<Methods>,
    file: *mut ffi::sqlite3_file,
    change: impl FnOnce(&mut ffi::sqlite3_io_methods),
) -> Option<&'static ffi::sqlite3_io_methods> {
    let methods = table.get_or_init(|| {
        let base = (*file).pMethods;
        let mut ours = *base;
        change(&mut ours);
        Methods { ours, base }
    });
    ptr::eq(methods.base, (*file).pMethods).then_some(&methods.ours)
}

/// The methods of our WAL files: the base VFS's, with a sync that [`with_durable_wal`] skips.
static WAL_METHODS: OnceLock<Methods> = OnceLock::new();

thread_local! {
    /// Set by [`with_durable_wal`] on the thread it runs on.
    static DURABLE_WAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a checkpoint, or a close that checkpoints), in which, if `durable`, SQLite does
/// not sync the WAL of a database of ours: the caller knows that every frame of it is durable
/// already (the runtime synced them: see `CommitGate::wal_is_durable`). SQLite syncs the
/// database's file as usual, and only then counts the frames as copied, so the WAL is started
/// over only once the database holds them durably. Only on this thread, only for `f`.
pub(crate) fn with_durable_wal<T>(durable: bool, f: impl FnOnce() -> T) -> T {
    DURABLE_WAL.set(durable);
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            DURABLE_WAL.set(false);
        }
    }
    let _reset = Reset;
    f()
}

/// Syncs a WAL file through the base VFS, unless [`with_durable_wal`] says it is durable.
unsafe extern "C" fn wal_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    if DURABLE_WAL.get() {
        return ffi::SQLITE_OK;
    }
    let base = WAL_METHODS
        .get()
        .expect("set before a WAL of ours opens")
        .base;
    match (*base).xSync {
        Some(sync) => sync(file, flags),
        None => ffi::SQLITE_OK,
    }
}

/// Releases the WAL index, then closes the file through the base VFS.
unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    shm_unmap(file, 0);
    ptr::drop_in_place(ext(file));
    let base = METHODS.get().expect("set before a file of ours opens").base;
    match (*base).xClose {
        Some(close) => close(file),
        None => ffi::SQLITE_OK,
    }
}

/// Maps region `region` of the WAL index (`size` bytes): made, zeroed, if `extend`; otherwise a
/// region not made yet is a null pointer, as for a `-shm` file too short.
unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let ext = ext(file);
    let (Ok(region), Ok(size)) = (usize::try_from(region), usize::try_from(size)) else {
        return ffi::SQLITE_IOERR_SHMMAP;
    };
    if ext.size != 0 && ext.size != size {
        return ffi::SQLITE_IOERR_SHMMAP; // SQLite maps every region in one size
    }
    ext.size = size;
    while ext.regions.len() <= region {
        if extend == 0 {
            *out = ptr::null_mut();
            return ffi::SQLITE_OK;
        }
        match take(size) {
            Some(p) => ext.regions.push(p),
            None => return ffi::SQLITE_IOERR_SHMMAP,
        }
    }
    *out = ext.regions[region].cast();
    ffi::SQLITE_OK
}

/// Gives back the pages of the WAL index of `conn` past its header, if its WAL is checkpointed
/// whole: every frame is in the database then, readers read the database alone, and the next
/// write starts the WAL over, zeroing the index before it writes there. Call it between
/// transactions. A database of another VFS is left as it is.
pub(crate) fn release_index(conn: &rusqlite::Connection) {
    let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
    // SAFETY: the handle is open; SQLITE_FCNTL_FILE_POINTER writes the main database's
    // `sqlite3_file` pointer to its argument.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            (&raw mut file).cast(),
        )
    };
    let Some(methods) = METHODS.get() else {
        return;
    };
    // SAFETY: a non-null file of the open connection; its methods say whether it is ours.
    if rc != ffi::SQLITE_OK
        || file.is_null()
        || !ptr::eq(unsafe { (*file).pMethods }, &methods.ours)
    {
        return;
    }
    // SAFETY: the file is ours and open; no transaction runs (the caller's word), so nothing
    // reads or writes the index meanwhile.
    let ext = unsafe { ext(file) };
    let Some(&header) = ext.regions.first() else {
        return;
    };
    // SAFETY: region 0 starts with the index header (`mxFrame`, the last frame in the WAL, at
    // byte 16) and the checkpoint's (`nBackfill`, the last frame copied into the database, at
    // byte 96), both native-endian u32s, in its first page.
    let (max_frame, backfilled) = unsafe {
        (
            header.add(16).cast::<u32>().read_volatile(),
            header.add(96).cast::<u32>().read_volatile(),
        )
    };
    if max_frame != backfilled {
        return;
    }
    let page = page_size();
    for (i, &p) in ext.regions.iter().enumerate() {
        let keep = if i == 0 { page } else { 0 };
        if ext.size > keep {
            // SAFETY: a region of ours, `ext.size` bytes; what it held is not read again before
            // it is written (see above), and reads as zeros meanwhile.
            unsafe { libc::madvise(p.add(keep).cast(), ext.size - keep, libc::MADV_DONTNEED) };
        }
    }
}

/// The system's page size.
fn page_size() -> usize {
    // SAFETY: sysconf only reads a setting.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Locks on the WAL index: nobody else has it (see the module's docs).
unsafe extern "C" fn shm_lock(_: *mut ffi::sqlite3_file, _: c_int, _: c_int, _: c_int) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn shm_barrier(_: *mut ffi::sqlite3_file) {
    fence(Ordering::SeqCst);
}

/// Gives the WAL index's regions back (they are made again, zeroed, when next mapped).
unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, _delete: c_int) -> c_int {
    let ext = ext(file);
    for p in ext.regions.drain(..) {
        give_back(p, ext.size);
    }
    ffi::SQLITE_OK
}

/// The pool of free regions of [`REGION`] bytes: zeroed and not resident.
static POOL: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// A zeroed region of `size` bytes, from the pool if it is a [`REGION`].
fn take(size: usize) -> Option<*mut u8> {
    if size != REGION {
        return map(size);
    }
    let mut pool = lock(&POOL);
    if pool.is_empty() {
        let mapping = map(REGION * REGIONS_PER_MAPPING)? as usize;
        pool.extend((0..REGIONS_PER_MAPPING).rev().map(|i| mapping + i * REGION));
    }
    pool.pop().map(|p| p as *mut u8)
}

/// Returns a region from [`take`]: its pages go back to the system, and read as zeros after.
fn give_back(p: *mut u8, size: usize) {
    if size != REGION {
        // SAFETY: `p` is a mapping of `size` bytes made by `map`, no longer used.
        unsafe { libc::munmap(p.cast(), size) };
        return;
    }
    // SAFETY: `p` is a region of a private anonymous mapping, no longer used: MADV_DONTNEED
    // frees its pages, and the next access finds them zero-filled.
    if unsafe { libc::madvise(p.cast(), size, libc::MADV_DONTNEED) } == 0 {
        lock(&POOL).push(p as usize);
    }
    // Else (never seen) the region is leaked rather than reused dirty.
}

/// A private anonymous mapping of `size` bytes (zero-filled, resident only once written).
fn map(size: usize) -> Option<*mut u8> {
    // SAFETY: a new mapping, at an address of the kernel's choice.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p.cast())
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, OpenFlags};

    use super::*;

    #[test]
    fn the_wal_is_taken_as_durable_only_inside_the_closure_and_on_its_thread() {
        assert!(with_durable_wal(true, || DURABLE_WAL.get()));
        assert!(!DURABLE_WAL.get());
        assert!(!with_durable_wal(false, || DURABLE_WAL.get()));
        let other = || std::thread::spawn(|| DURABLE_WAL.get()).join().unwrap();
        assert!(
            !with_durable_wal(true, other),
            "another thread syncs as usual"
        );
        let panicked =
            std::panic::catch_unwind(|| with_durable_wal(true, || panic!("in a checkpoint")));
        assert!(panicked.is_err());
        assert!(!DURABLE_WAL.get(), "reset by the unwinding too");
    }

    fn open(path: &std::path::Path) -> Connection {
        assert!(register());
        let conn = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), NAME).unwrap();
        conn.pragma_update(None, "synchronous", "OFF").unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn
    }

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    fn insert(conn: &Connection, rows: usize) {
        for _ in 0..rows {
            conn.execute("INSERT INTO t(v) VALUES (randomblob(200))", [])
                .unwrap();
        }
    }

    /// How many pages of the WAL index of `conn` are resident.
    fn resident(conn: &Connection) -> usize {
        let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
        // SAFETY: as in `release_index`.
        unsafe {
            ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_FILE_POINTER,
                (&raw mut file).cast(),
            );
            let ext = ext(file);
            let pages = ext.size / page_size();
            let mut vec = vec![0u8; pages];
            ext.regions
                .iter()
                .map(|&p| {
                    assert_eq!(libc::mincore(p.cast(), ext.size, vec.as_mut_ptr()), 0);
                    vec.iter().filter(|&&b| b & 1 == 1).count()
                })
                .sum()
        }
    }

    #[test]
    fn wal_runs_without_exclusive_locking_and_a_crash_leaves_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let conn = open(&path);
        let locking: String = conn
            .query_row("PRAGMA locking_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(locking, "normal");
        conn.execute_batch("CREATE TABLE t(v BLOB)").unwrap();
        insert(&conn, 500);
        assert!(path.with_extension("sqlite-wal").exists());
        assert!(!path.with_extension("sqlite-shm").exists(), "no -shm file");
        // A crash: never closed, never checkpointed. The next connection rebuilds the index
        // from the WAL.
        std::mem::forget(conn);
        let again = open(&path);
        assert_eq!(count(&again), 500);
        insert(&again, 10);
        assert_eq!(count(&again), 510);
        drop(again);
        assert!(
            !path.with_extension("sqlite-wal").exists(),
            "a close checkpoints"
        );
        assert_eq!(count(&open(&path)), 510);
    }

    #[test]
    fn the_index_is_given_back_only_once_the_wal_is_checkpointed_and_the_data_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let conn = open(&path);
        conn.execute_batch("CREATE TABLE t(v BLOB)").unwrap();
        insert(&conn, 200);
        let busy = resident(&conn);
        assert_eq!(
            busy,
            REGION / page_size(),
            "the first append zeroes the whole region"
        );
        release_index(&conn); // frames not in the database yet: kept
        assert_eq!(resident(&conn), busy);
        assert_eq!(count(&conn), 200);

        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        release_index(&conn);
        assert_eq!(resident(&conn), 1, "only the header's page stays");
        assert_eq!(count(&conn), 200);
        // Written again: the WAL starts over, and its index with it.
        insert(&conn, 100);
        assert_eq!(count(&conn), 300);
        std::mem::forget(conn); // a crash
        assert_eq!(count(&open(&path)), 300);
    }

    #[test]
    fn the_pool_gives_zeroed_regions() {
        let regions: Vec<_> = (0..REGIONS_PER_MAPPING + 3)
            .map(|_| take(REGION).unwrap())
            .collect();
        for &p in &regions {
            // SAFETY: a region of REGION bytes, ours until given back.
            unsafe {
                assert!(std::slice::from_raw_parts(p, REGION)
                    .iter()
                    .all(|&b| b == 0));
                p.write_bytes(0xAB, REGION);
            }
        }
        for p in regions {
            give_back(p, REGION);
        }
        let again = take(REGION).unwrap();
        // SAFETY: as above.
        unsafe {
            assert!(std::slice::from_raw_parts(again, REGION)
                .iter()
                .all(|&b| b == 0));
        }
        give_back(again, REGION);
    }
}
