//! Per-agent SQLite files: opening them, the typed key-value store and schema migrations.
//!
//! Each agent owns one database in WAL mode at `<data_dir>/agents/<id[..2]>/<id>.sqlite`.
//! Tables whose names start with `_agents_` belong to the runtime; every other table is the
//! agent's own.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{de::DeserializeOwned, Serialize};

use crate::{address::AgentKey, error::Error};

/// How durable a reply is when the caller receives it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// A reply is released only after its writes are fsynced (`synchronous=FULL`): it survives
    /// a process crash *and* a power loss. The default.
    #[default]
    Full,
    /// A reply is released after its writes reach the operating system (`synchronous=NORMAL`
    /// in WAL mode): it survives a crash of the process, but the last commits can be lost if the
    /// machine loses power. Much cheaper per commit.
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }
}

/// Where the database of `key` lives under `data_dir`.
pub(crate) fn db_path(data_dir: &Path, key: &AgentKey) -> PathBuf {
    let id = key.id();
    data_dir
        .join("agents")
        .join(&id[..2])
        .join(format!("{id}.sqlite"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens (creating if needed) the database of `key`. Blocking: call it off the async workers.
pub(crate) fn open(
    data_dir: &Path,
    key: &AgentKey,
    durability: Durability,
) -> Result<Connection, Error> {
    let path = db_path(data_dir, key);
    let dir = path.parent().expect("db_path has a parent");
    let created = !path.exists();
    if created {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let conn = Connection::open(&path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", durability.pragma())?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _agents_meta(k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS _agents_kv(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
         INSERT OR IGNORE INTO _agents_meta(k, v) VALUES ('class', '') , ('name', '');",
    )?;
    // Record the address on first open, and check it on every later one: two addresses whose
    // ids collide must never share a file.
    conn.execute(
        "UPDATE _agents_meta SET v = ?1 WHERE k = 'class' AND v = ''",
        [key.class()],
    )?;
    conn.execute(
        "UPDATE _agents_meta SET v = ?1 WHERE k = 'name' AND v = ''",
        [key.name()],
    )?;
    let (class, name): (String, String) = conn.query_row(
        "SELECT (SELECT v FROM _agents_meta WHERE k='class'), (SELECT v FROM _agents_meta WHERE k='name')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if class != key.class() || name != key.name() {
        return Err(Error::InvalidAddress(format!(
            "{} belongs to {class}/{name}, not to {key}",
            path.display()
        )));
    }
    if created {
        // Make the new file's directory entries durable too.
        for d in [dir, dir.parent().expect("agents dir")] {
            fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(io(d))?;
        }
    }
    Ok(conn)
}

/// A typed key-value store in the agent's database (`ctx.kv()`), values encoded with postcard.
///
/// Writes are part of the current event's transaction, like any other SQL.
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
        let bytes: Option<Vec<u8>> = stmt.query_row([key.as_bytes()], |r| r.get(0)).optional()?;
        bytes.map(|b| decode(key, &b)).transpose()
    }

    /// Stores `value` at `key`, replacing what was there.
    pub fn put<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), Error> {
        let bytes =
            postcard::to_stdvec(value).map_err(|e| Error::Codec(format!("kv `{key}`: {e}")))?;
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO _agents_kv(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        )?;
        stmt.execute(params![key.as_bytes(), bytes])?;
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
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (k, v) = row?;
            let k = String::from_utf8(k)
                .map_err(|e| Error::Codec(format!("kv key is not UTF-8: {e}")))?;
            let v = decode(&k, &v)?;
            out.push((k, v));
        }
        Ok(out)
    }

    /// Removes every entry; returns how many there were.
    pub fn delete_all(&self) -> Result<usize, Error> {
        Ok(self.conn.execute("DELETE FROM _agents_kv", [])?)
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, Error> {
    postcard::from_bytes(bytes).map_err(|e| {
        Error::Codec(format!(
            "kv `{key}` does not decode as the requested type: {e}"
        ))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_round_trips_and_lists_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "x").unwrap();
        let conn = open(dir.path(), &key, Durability::Normal).unwrap();
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
        let conn = open(dir.path(), &key, Durability::Normal).unwrap();
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
    fn a_file_remembers_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("t", "a\0b/../c").unwrap();
        drop(open(dir.path(), &key, Durability::Full).unwrap());
        let path = db_path(dir.path(), &key);
        assert!(path.starts_with(dir.path()) && path.exists());
        // Pretend another address hashed to the same file.
        let other = AgentKey::new("t", "other").unwrap();
        fs::create_dir_all(db_path(dir.path(), &other).parent().unwrap()).unwrap();
        fs::copy(&path, db_path(dir.path(), &other)).unwrap();
        assert!(matches!(
            open(dir.path(), &other, Durability::Full),
            Err(Error::InvalidAddress(_))
        ));
    }
}
