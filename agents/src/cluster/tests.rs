//! The cluster's statements against a real PostgreSQL (see `testing::TestDatabase`): each
//! test makes a database of its own and drops it.

use std::time::Duration;

use rusqlite::Connection;

use super::store::APPEND;
use super::*;
use crate::{address::AgentKey, replica, testing::TestDatabase};

const TTL: Duration = Duration::from_secs(60);

/// Two nodes' connections, `n1` and `n2`, each registered with a lease.
async fn two_nodes(db: &TestDatabase) -> (Store, Store) {
    let (one, two) = (store(&db.url).await, store(&db.url).await);
    one.register("n1", "127.0.0.1:1", TTL).await.unwrap();
    two.register("n2", "127.0.0.1:2", TTL).await.unwrap();
    (one, two)
}

async fn store(url: &str) -> Store {
    let store = Store::connect(url).await.unwrap();
    store.migrate().await.unwrap();
    store
}

/// Ends `node`'s lease now (as if it had stopped renewing it).
async fn expire(db: &TestDatabase, node: &str) {
    let sql = format!(
        "UPDATE agents_nodes SET lease_until = now() - interval '1 second' WHERE id = '{node}'"
    );
    db.execute(&sql).await;
}

fn key(name: &str) -> AgentKey {
    AgentKey::new("counter", name).unwrap()
}

/// A change set of one page that commits (what the fences are checked with).
fn set(byte: u8) -> replica::ChangeSet {
    let mut frames = vec![byte; 24 + 512];
    frames[..8].copy_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
    replica::ChangeSet {
        page_size: 512,
        frames,
    }
}

#[tokio::test]
async fn a_take_bumps_the_epoch_only_when_the_owner_is_dead() {
    let db = TestDatabase::new().await;
    let (one, two) = two_nodes(&db).await;
    let k = key("bob");
    let taken = Owner::Taken {
        epoch: 1,
        new: true,
    };
    assert_eq!(one.take("n1", &k).await.unwrap(), taken);
    let kept = Owner::Kept {
        epoch: 1,
        last_seq: 0,
        has_base: false,
    };
    assert_eq!(one.take("n1", &k).await.unwrap(), kept);
    let elsewhere = Owner::Other {
        node: "n1".into(),
        addr: "127.0.0.1:1".into(),
    };
    assert_eq!(two.take("n2", &k).await.unwrap(), elsewhere);

    expire(&db, "n1").await;
    let moved = Owner::Taken {
        epoch: 2,
        new: false,
    };
    assert_eq!(two.take("n2", &k).await.unwrap(), moved);
    // The old owner's lease cannot be renewed once it expired, and it takes nothing.
    assert!(!one.renew("n1", TTL).await.unwrap());
    assert!(two.renew("n2", TTL).await.unwrap());
    assert!(matches!(one.take("n1", &k).await.unwrap(), Owner::Other { node, .. } if node == "n2"));
    assert!(
        matches!(one.take("n1", &key("new")).await.unwrap(), Owner::Other { node, .. } if node.is_empty())
    );
    // Registering again (a restarted node) gives it a lease, and it takes a dead node's agent.
    one.register("n1", "127.0.0.1:1", TTL).await.unwrap();
    expire(&db, "n2").await;
    assert_eq!(
        one.take("n1", &k).await.unwrap(),
        Owner::Taken {
            epoch: 3,
            new: false
        }
    );
}

#[tokio::test]
async fn an_append_at_a_stale_epoch_is_refused() {
    let db = TestDatabase::new().await;
    let (one, two) = two_nodes(&db).await;
    let (k, other) = (key("bob"), key("ann"));
    one.take("n1", &k).await.unwrap();
    one.take("n1", &other).await.unwrap();
    let (s1, s2, s3) = (set(1), set(2), set(3));
    let first = [
        Append {
            key: &k,
            epoch: 1,
            seq: 1,
            set: &s1,
        },
        Append {
            key: &other,
            epoch: 1,
            seq: 1,
            set: &s1,
        },
    ];
    assert_eq!(one.append("n1", &first).await.unwrap(), [true, true]);

    // n1 is paused past its lease; n2 takes bob (not ann) and writes.
    expire(&db, "n1").await;
    assert!(matches!(
        two.take("n2", &k).await.unwrap(),
        Owner::Taken { epoch: 2, .. }
    ));
    let restored = two.restore(&k).await.unwrap();
    assert_eq!(restored.last_seq(), 1);
    assert_eq!(restored.sets[0].1, s1);
    let late = [
        Append {
            key: &k,
            epoch: 1,
            seq: 2,
            set: &s2,
        },
        Append {
            key: &other,
            epoch: 1,
            seq: 2,
            set: &s2,
        },
    ];
    assert_eq!(
        one.append("n1", &late).await.unwrap(),
        [false, true],
        "the moved agent's set is refused, the other's kept"
    );
    let new = [Append {
        key: &k,
        epoch: 2,
        seq: 2,
        set: &s3,
    }];
    assert_eq!(two.append("n2", &new).await.unwrap(), [true]);
    let history: Vec<_> = two.restore(&k).await.unwrap().sets;
    assert_eq!(history, [(1, s1.clone()), (2, s3)]);
    // A snapshot at a stale epoch is refused too.
    assert!(matches!(
        one.snapshot("n1", &k, 1, 2, b"image").await,
        Err(StoreError::Fenced(..))
    ));
    // The owner that keeps it is told how far its log goes.
    let kept = Owner::Kept {
        epoch: 2,
        last_seq: 2,
        has_base: false,
    };
    assert_eq!(two.take("n2", &k).await.unwrap(), kept);
    // A removal is fenced too; the owner's deletes everything, and the next take starts anew.
    assert!(matches!(
        one.remove("n1", &k, 1).await,
        Err(StoreError::Fenced(..))
    ));
    two.remove("n2", &k, 2).await.unwrap();
    assert!(two.restore(&k).await.unwrap().sets.is_empty());
    let anew = Owner::Taken {
        epoch: 1,
        new: true,
    };
    assert_eq!(two.take("n2", &k).await.unwrap(), anew);
}

#[tokio::test]
async fn tables_of_a_newer_runtime_are_refused() {
    let db = TestDatabase::new().await;
    store(&db.url).await;
    db.execute("UPDATE agents_schema SET version = 99").await;
    let e = Store::connect(&db.url)
        .await
        .unwrap()
        .migrate()
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Newer(99)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_waits_for_an_append_in_flight() {
    let db = TestDatabase::new().await;
    let (one, two) = two_nodes(&db).await;
    let k = key("bob");
    one.take("n1", &k).await.unwrap();
    expire(&db, "n1").await;

    // n1's append is in flight: its statement ran, its transaction has not committed.
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let s1 = set(1);
    let frames: Vec<&[u8]> = vec![&s1.frames];
    let kept = tx
        .query(
            APPEND,
            &[
                &vec!["counter"],
                &vec!["bob"],
                &vec![1i64],
                &vec![1i64],
                &vec![512i32],
                &frames,
                &"n1",
            ],
        )
        .await
        .unwrap();
    assert_eq!(kept.len(), 1);
    let take = tokio::spawn(async move { (two.take("n2", &key("bob")).await.unwrap(), two) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !take.is_finished(),
        "a take waits for the append's transaction"
    );
    tx.commit().await.unwrap();
    let (owner, two) = take.await.unwrap();
    assert!(matches!(owner, Owner::Taken { epoch: 2, .. }));
    assert_eq!(two.restore(&k).await.unwrap().sets, [(1, s1)]);
}

#[tokio::test]
async fn a_snapshot_and_the_log_after_it_rebuild_the_database() {
    let db = TestDatabase::new().await;
    let url = &db.url;
    let store = store(url).await;
    store.register("n1", "a", TTL).await.unwrap();
    let k = key("bob");
    store.take("n1", &k).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (path, wal) = (dir.path().join("a.sqlite"), dir.path().join("a.sqlite-wal"));
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT); PRAGMA wal_checkpoint(TRUNCATE);",
    )
    .unwrap();
    // The image a snapshot would hold: the file, with the sets applied as they are shipped.
    let image = dir.path().join("image.sqlite");
    std::fs::copy(&path, &image).unwrap();
    let image_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    let mut shipped = 0;
    for seq in 1..=12i64 {
        conn.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("{seq}{}", "x".repeat(seq as usize * 100))],
        )
        .unwrap();
        let frames = (std::fs::metadata(&wal).unwrap().len() - 32) / (24 + 4096);
        let change = replica::read_frames(&wal, shipped..frames as u32).unwrap();
        shipped = frames as u32;
        let batch = [Append {
            key: &k,
            epoch: 1,
            seq,
            set: &change,
        }];
        assert_eq!(store.append("n1", &batch).await.unwrap(), [true]);
        replica::apply(&image_file, &change).unwrap();
        if seq == 6 {
            let bytes = std::fs::read(&image).unwrap();
            store.snapshot("n1", &k, 1, 6, &bytes).await.unwrap();
        }
    }
    let restored = store.restore(&k).await.unwrap();
    assert_eq!(restored.snapshot_seq, 6);
    assert_eq!(
        restored.sets.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (7..=12).collect::<Vec<_>>(),
        "the log up to the snapshot is gone"
    );
    let rebuilt = dir.path().join("rebuilt.sqlite");
    std::fs::write(&rebuilt, restored.image.as_deref().unwrap()).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&rebuilt)
        .unwrap();
    for (_, change) in &restored.sets {
        replica::apply(&file, change).unwrap();
    }
    drop(file);
    let copy = Connection::open(&rebuilt).unwrap();
    let ok: String = copy
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let all = |c: &Connection| -> Vec<String> {
        let mut s = c.prepare("SELECT v FROM t ORDER BY k").unwrap();
        s.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(all(&copy), all(&conn));
    assert_eq!(all(&copy).len(), 12);
}

#[tokio::test]
async fn only_the_owner_sets_alarms_and_a_dead_nodes_due_alarms_are_found() {
    let db = TestDatabase::new().await;
    let (one, two) = two_nodes(&db).await;
    let (early, late) = (key("early"), key("late"));
    for k in [&early, &late] {
        one.take("n1", k).await.unwrap();
    }
    one.set_alarm("n1", &early, Some(100)).await.unwrap();
    one.set_alarm("n1", &late, Some(900)).await.unwrap();
    // Not n2's: its writes change nothing.
    two.set_alarm("n2", &early, Some(5_000)).await.unwrap();
    two.set_alarm("n2", &late, None).await.unwrap();
    // Due, but their node is alive.
    assert_eq!(two.orphans(1_000).await.unwrap(), vec![]);

    expire(&db, "n1").await;
    assert_eq!(
        two.orphans(1_000).await.unwrap(),
        vec![early.clone(), late.clone()]
    );
    assert_eq!(two.orphans(500).await.unwrap(), vec![early.clone()]);
    // Taken, it is no orphan; the new owner's entry stands.
    two.take("n2", &early).await.unwrap();
    two.set_alarm("n2", &early, Some(2_000)).await.unwrap();
    assert_eq!(two.orphans(1_000).await.unwrap(), vec![late.clone()]);
    // A removed agent's entry goes with its other rows.
    let epoch = match two.take("n2", &late).await.unwrap() {
        Owner::Taken { epoch, .. } => epoch,
        other => panic!("{other:?}"),
    };
    two.remove("n2", &late, epoch).await.unwrap();
    expire(&db, "n2").await;
    assert_eq!(two.orphans(u64::MAX).await.unwrap(), vec![early]);
}
