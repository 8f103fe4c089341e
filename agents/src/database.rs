//! A live agent's open database: its SQLite connection (what `ctx.sql()` hands out) and the
//! savepoint the runtime opens around every event: `SAVEPOINT agents_event` and `RELEASE
//! agents_event` kept prepared next to it, and the rollback of a failed event.
//!
//! Taken from rusqlite's statement cache, each of them would cost an allocation for its key and
//! a removal and an insertion in the cache's map every time (~8 % of what a small
//! pipelined call costs the agent, under callgrind). Prepared here once, running one is a step
//! and a reset. They are prepared at their first use and finalized when the agent goes quiet
//! (see `Builder::quiet_after`), and always before the connection closes: SQLite refuses to
//! close a connection that still has statements.

use std::{cell::OnceCell, ffi::CStr, ptr::NonNull};

use rusqlite::{ffi, Connection};

/// An open database and the event statements prepared on it.
pub(crate) struct Database {
    /// Declared before `conn`: dropped (finalized) first.
    event: OnceCell<EventStatements>,
    conn: Connection,
}

impl Database {
    pub(crate) fn new(conn: Connection) -> Self {
        Database {
            event: OnceCell::new(),
            conn,
        }
    }

    /// The connection, its statements finalized (to close it, or to hand it to code that
    /// expects a plain connection).
    pub(crate) fn into_connection(self) -> Connection {
        let Database { event, conn } = self;
        drop(event);
        conn
    }

    /// Finalizes the event statements; the next event prepares them again.
    pub(crate) fn forget_statements(&mut self) {
        self.event.take();
    }

    /// Opens the savepoint of one event.
    pub(crate) fn savepoint(&self) -> rusqlite::Result<()> {
        self.run(|s| &s.savepoint)
    }

    /// Releases the savepoint of one event (its writes join the batch's transaction).
    pub(crate) fn release(&self) -> rusqlite::Result<()> {
        self.run(|s| &s.release)
    }

    /// Rolls one event's writes back and ends its savepoint (a failed event: rare, so not kept
    /// prepared).
    pub(crate) fn roll_back(&self) -> rusqlite::Result<()> {
        self.conn
            .execute_batch("ROLLBACK TO agents_event; RELEASE agents_event")
    }

    fn run(&self, which: fn(&EventStatements) -> &Statement) -> rusqlite::Result<()> {
        let event = match self.event.get() {
            Some(event) => event,
            None => {
                let prepared = EventStatements {
                    savepoint: Statement::prepare(&self.conn, c"SAVEPOINT agents_event")?,
                    release: Statement::prepare(&self.conn, c"RELEASE agents_event")?,
                };
                self.event.get_or_init(|| prepared)
            }
        };
        which(event).run(&self.conn)
    }
}

impl std::ops::Deref for Database {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// `SAVEPOINT agents_event` and `RELEASE agents_event`, prepared.
struct EventStatements {
    savepoint: Statement,
    release: Statement,
}

/// A prepared statement that takes no parameters and returns no rows; finalized on drop, which
/// must come before its connection's close (see `Database`).
struct Statement(NonNull<ffi::sqlite3_stmt>);

// SAFETY: a statement belongs to the connection next to it in `Database`, moves between threads
// with it (as rusqlite's `Connection` does) and is only used through it, one thread at a time
// (`Database` is not `Sync`: its connection is not).
unsafe impl Send for Statement {}

impl Statement {
    fn prepare(conn: &Connection, sql: &CStr) -> rusqlite::Result<Self> {
        let mut stmt = std::ptr::null_mut();
        // SAFETY: `conn`'s handle is open; `sql` is NUL-terminated (length -1).
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                conn.handle(),
                sql.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT as _,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        match NonNull::new(stmt) {
            Some(stmt) if rc == ffi::SQLITE_OK => Ok(Statement(stmt)),
            _ => Err(error(conn, rc)),
        }
    }

    /// Runs it to its end, and resets it for the next time.
    fn run(&self, conn: &Connection) -> rusqlite::Result<()> {
        // SAFETY: prepared on `conn`, which is open, and not finalized (that is its drop).
        let (rc, reset) = unsafe {
            let rc = ffi::sqlite3_step(self.0.as_ptr());
            (rc, ffi::sqlite3_reset(self.0.as_ptr()))
        };
        match rc {
            ffi::SQLITE_DONE => Ok(()),
            // After a failed step the reset says the same error (or the one it ran into).
            _ if reset != ffi::SQLITE_OK => Err(error(conn, reset)),
            _ => Err(error(conn, rc)),
        }
    }
}

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: its connection is still open (see `Database`); finalized once, here.
        unsafe { ffi::sqlite3_finalize(self.0.as_ptr()) };
    }
}

/// `rc` as rusqlite's error, with SQLite's message for it.
fn error(conn: &Connection, rc: std::os::raw::c_int) -> rusqlite::Error {
    // SAFETY: the handle is open; the message is copied before the next SQLite call.
    let message = unsafe {
        let text = ffi::sqlite3_errmsg(conn.handle());
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database() -> Database {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(x); BEGIN").unwrap();
        Database::new(conn)
    }

    fn count(db: &Database) -> i64 {
        db.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn an_event_savepoint_keeps_or_rolls_back_its_writes_and_closes_after_its_statements() {
        let mut db = database();
        for keep in [true, false, true] {
            db.savepoint().unwrap();
            db.execute("INSERT INTO t VALUES (1)", []).unwrap();
            if keep {
                db.release().unwrap();
            } else {
                db.roll_back().unwrap();
            }
        }
        assert_eq!(count(&db), 2);
        // Quiet: finalized, then prepared again at the next use.
        db.forget_statements();
        db.savepoint().unwrap();
        db.release().unwrap();
        db.execute_batch("COMMIT").unwrap();
        // Closing needs every statement finalized: `into_connection` does it.
        db.into_connection().close().map_err(|(_, e)| e).unwrap();
    }

    #[test]
    fn a_failing_statement_says_why_and_can_run_again() {
        let db = database();
        let e = db.release().unwrap_err();
        assert!(e.to_string().contains("no such savepoint"), "{e}");
        db.savepoint().unwrap();
        db.release().unwrap();
        let conn = db.into_connection();
        conn.close().map_err(|(_, e)| e).unwrap();
    }
}
