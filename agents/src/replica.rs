//! An agent's database as a physical change log: the WAL frames its batches committed, read
//! from the `-wal` file as they are (each a page's image), and applied in order to an image of
//! the database file to rebuild it elsewhere (cluster mode ships them to PostgreSQL and a new
//! owner restores the agent from a snapshot and the frames after it).
//!
//! SQLite's WAL format: a 32-byte header (magic, version, page size, checkpoint sequence, salts,
//! checksum), then frames of a 24-byte header (page number; for the last frame of a transaction,
//! the database's size in pages after it, else 0; salts; checksums) and one page. Applying a
//! frame writes its page at `(page number - 1) × page size`; a commit frame also sets the file's
//! length. A frame range the gate is told of always ends with a commit frame.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    ops::Range,
    os::unix::fs::FileExt,
    path::Path,
};

/// The WAL header's size.
const WAL_HEADER: u64 = 32;
/// A frame header's size.
const FRAME_HEADER: usize = 24;

/// Frames of an agent's WAL, as they are in the file: each a 24-byte header and a page.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ChangeSet {
    /// The database's page size.
    pub page_size: u32,
    /// The frames, back to back.
    pub frames: Vec<u8>,
}

impl ChangeSet {
    /// Checks that it is whole frames of a plausible page size and ends with a commit frame
    /// (what a change set read by [`read_frames`] always is).
    pub fn check(&self) -> io::Result<()> {
        let size = self.page_size as usize;
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
        if !(512..=65536).contains(&size) || !size.is_power_of_two() {
            return Err(bad("not a page size of SQLite's"));
        }
        if !self.frames.len().is_multiple_of(FRAME_HEADER + size) {
            return Err(bad("not whole frames"));
        }
        match self.frames.chunks(FRAME_HEADER + size).last() {
            None => Ok(()),
            Some(last) if be32(&last[4..8]) != 0 => Ok(()),
            Some(_) => Err(bad("the last frame is not a commit")),
        }
    }
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The page size a WAL file's header gives.
fn wal_page_size(wal: &mut File) -> io::Result<u32> {
    let mut header = [0u8; WAL_HEADER as usize];
    wal.seek(SeekFrom::Start(0))?;
    wal.read_exact(&mut header)?;
    let magic = be32(&header[0..4]);
    if magic != 0x377f_0682 && magic != 0x377f_0683 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a WAL file"));
    }
    Ok(be32(&header[8..12]))
}

/// Reads frames `frames.start + 1 ..= frames.end` (SQLite's numbering, from the WAL's start) of
/// the WAL at `wal`.
pub(crate) fn read_frames(wal: &Path, frames: Range<u32>) -> io::Result<ChangeSet> {
    if frames.is_empty() {
        return Ok(ChangeSet::default());
    }
    let mut file = File::open(wal)?;
    let page_size = wal_page_size(&mut file)?;
    let frame = (FRAME_HEADER + page_size as usize) as u64;
    let mut bytes = vec![0u8; (frames.len() as u64 * frame) as usize];
    file.read_exact_at(&mut bytes, WAL_HEADER + u64::from(frames.start) * frame)?;
    let set = ChangeSet {
        page_size,
        frames: bytes,
    };
    set.check()?;
    Ok(set)
}

/// Applies `set` to the database image `db` (a file holding the database as of the change
/// sets before it), as a checkpoint would.
pub(crate) fn apply(db: &File, set: &ChangeSet) -> io::Result<()> {
    set.check()?;
    let size = set.page_size as usize;
    for frame in set.frames.chunks(FRAME_HEADER + size) {
        let (header, page) = frame.split_at(FRAME_HEADER);
        let page_number = be32(&header[0..4]);
        if page_number == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "page 0"));
        }
        db.write_all_at(page, u64::from(page_number - 1) * size as u64)?;
        let pages_after_commit = be32(&header[4..8]);
        if pages_after_commit != 0 {
            db.set_len(u64::from(pages_after_commit) * size as u64)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// How many frames the WAL at `wal` holds.
    fn frames_in(wal: &Path) -> u32 {
        let len = std::fs::metadata(wal).unwrap().len();
        let mut file = File::open(wal).unwrap();
        let page = wal_page_size(&mut file).unwrap() as u64;
        ((len - WAL_HEADER) / (FRAME_HEADER as u64 + page)) as u32
    }

    #[test]
    fn frames_applied_to_a_snapshot_rebuild_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let wal = dir.path().join("a.sqlite-wal");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
             CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);",
        )
        .unwrap();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        // The snapshot: the file after a checkpoint.
        let image = dir.path().join("image.sqlite");
        std::fs::copy(&path, &image).unwrap();

        // Batches, each shipped as the frames it added.
        let mut sets = Vec::new();
        let mut shipped = 0;
        for batch in 0..20 {
            let tx = conn.unchecked_transaction().unwrap();
            for i in 0..50 {
                let v = format!("{batch}-{i}-{}", "x".repeat(batch * 40));
                tx.execute(
                    "INSERT OR REPLACE INTO t(k, v) VALUES (?1, ?2)",
                    rusqlite::params![(batch * 37 + i) % 400, v],
                )
                .unwrap();
            }
            if batch % 7 == 6 {
                tx.execute("DELETE FROM t WHERE k % 3 = 0", []).unwrap();
            }
            tx.commit().unwrap();
            let end = frames_in(&wal);
            sets.push(read_frames(&wal, shipped..end).unwrap());
            shipped = end;
        }
        assert!(sets.iter().all(|s| !s.frames.is_empty()));

        let db = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        for set in &sets {
            apply(&db, set).unwrap();
        }
        drop(db);
        let rebuilt = Connection::open(&image).unwrap();
        let check: String = rebuilt
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let dump = |c: &Connection| -> Vec<(i64, String)> {
            let mut s = c.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(dump(&rebuilt), dump(&conn));
        assert!(!dump(&conn).is_empty());
    }

    #[test]
    fn what_is_not_frames_is_refused() {
        let torn = ChangeSet {
            page_size: 4096,
            frames: vec![0; 100],
        };
        assert!(torn.check().is_err());
        let odd = ChangeSet {
            page_size: 1000,
            frames: Vec::new(),
        };
        assert!(odd.check().is_err());
        // A whole frame that does not end a transaction.
        let open = ChangeSet {
            page_size: 512,
            frames: vec![0; 24 + 512],
        };
        assert!(open.check().is_err());
    }
}
