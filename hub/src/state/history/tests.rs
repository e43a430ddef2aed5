use super::*;
use crate::state::TaskRecord;
use serde_json::json;

/// A sled database in a directory of its own, with room for the store's bodies beside it.
fn on_disk() -> (tempfile::TempDir, sled::Db, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .open()
        .unwrap();
    let bodies = dir.path().join("history");
    (dir, db, bodies)
}

fn finished(id: &str, ended_at_ms: i64) -> TaskRecord {
    let mut t = TaskRecord::new(id, "echo", "t", "a", json!({"text": "x".repeat(500)}), 1);
    t.status = TaskStatus::Succeeded;
    t.updated_at_ms = ended_at_ms;
    t
}

/// Expiring a record writes its expiry beside it, not the record again; readers and
/// replays see it expired from that index on; a purge takes both.
#[test]
fn expiry_marks_a_record_without_rewriting_it() {
    let h = History::default();
    h.archive(5, &[finished("a", 100), finished("b", 200)], &[])
        .unwrap();
    let b = h.backend();
    let before = b.get(TASKS, b"a").unwrap().unwrap();
    assert_eq!(h.expire(9, &History::cut(100, None)).unwrap(), 1);
    assert_eq!(
        b.get(TASKS, b"a").unwrap().unwrap(),
        before,
        "record untouched"
    );
    assert_eq!(h.gone(&b, b"ta").unwrap(), Some(9));
    assert!(matches!(h.task("a").unwrap(), Lookup::Expired { .. }));
    assert!(matches!(h.task("b").unwrap(), Lookup::Found(_)));
    assert_eq!(h.task_at("a", 8).unwrap(), Some(TaskStatus::Succeeded));
    assert_eq!(h.task_at("a", 9).unwrap(), None);
    assert_eq!(h.len(), 1);
    // Replayed at the same index, it is the same expiry, counted once.
    assert_eq!(h.expire(9, &History::cut(100, None)).unwrap(), 0);
    assert_eq!(h.purge(8).unwrap(), 0, "not covered by a snapshot yet");
    assert!(b.get(TASKS, b"a").unwrap().is_some());
    assert_eq!(h.purge(9).unwrap(), 1);
    assert!(b.get(TASKS, b"a").unwrap().is_none());
    assert_eq!(h.gone(&b, b"ta").unwrap(), None);
    assert_eq!(h.task("a").unwrap(), Lookup::Missing);
    // A purge cut short after the record went (a crash) still clears its mark later.
    assert_eq!(h.expire(12, &History::cut(200, None)).unwrap(), 1);
    b.remove(TASKS, b"b").unwrap();
    assert_eq!(h.purge(12).unwrap(), 1);
    assert_eq!(h.gone(&b, b"tb").unwrap(), None, "nothing left behind");
}

/// A record written before expiries had their own tree carries `expired_at` inside.
#[test]
fn an_expiry_inside_an_older_record_is_honoured() {
    let h = History::default();
    let t = finished("old", 100);
    let stored = Stored {
        archived_at: 3,
        expired_at: Some(7),
        tenant: t.tenant.clone(),
        key: None,
        ended_at_ms: 100,
        record: Some(&t),
        body: None,
        status: None,
    };
    h.backend().insert(TASKS, b"old", &encode(&stored)).unwrap();
    h.backend()
        .insert(EXPIRED, &join(&[&7u64.to_be_bytes(), b"t", b"old"]), b"")
        .unwrap();
    assert!(matches!(h.task("old").unwrap(), Lookup::Expired { .. }));
    assert_eq!(h.task_at("old", 6).unwrap(), Some(TaskStatus::Succeeded));
    assert_eq!(h.task_at("old", 7).unwrap(), None);
    assert_eq!(h.purge(7).unwrap(), 1);
    assert_eq!(h.task("old").unwrap(), Lookup::Missing);
}

#[test]
fn a_header_reads_back_as_written() {
    for h in [
        Header {
            archived_at: 7,
            dead: true,
            tenant: "acme".into(),
            key: Some("k\0é".into()),
        },
        Header {
            archived_at: u64::MAX,
            dead: false,
            tenant: String::new(),
            key: None,
        },
        Header {
            archived_at: 0,
            dead: false,
            tenant: "t".into(),
            key: Some(String::new()),
        },
    ] {
        assert_eq!(Header::decode(&h.encode()), Some(h));
    }
    assert_eq!(Header::decode(b""), None, "an older store's empty value");
    let mut long = Header {
        archived_at: 1,
        dead: false,
        tenant: "t".into(),
        key: None,
    }
    .encode();
    long[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        Header::decode(&long),
        None,
        "a tenant longer than the value"
    );
}

/// A store an older hub wrote (empty `by_finish` values, `gone` holding the index alone,
/// tombstones listed in `expired`) expires and purges as a new one does.
#[test]
fn an_older_stores_records_expire_and_purge() {
    let h = History::default();
    let b = h.backend();
    let mut dead = finished("d", 100);
    dead.dead_lettered = true;
    dead.idempotency_key = Some("key-d".into());
    let (older, listed) = (finished("o", 100), finished("l", 50));
    for t in [&dead, &older, &listed] {
        let stored = Stored {
            archived_at: 3,
            expired_at: None,
            tenant: t.tenant.clone(),
            key: t.idempotency_key.clone(),
            ended_at_ms: t.updated_at_ms,
            record: Some(t),
            body: None,
            status: None,
        };
        b.insert(TASKS, t.id.as_bytes(), &encode(&stored)).unwrap();
        b.insert(BY_TENANT, &tenant_key(&t.tenant, &t.id), b"")
            .unwrap();
        if let Some(k) = &t.idempotency_key {
            let k = join(&[&key_prefix(KIND_TASK, &t.tenant, k), t.id.as_bytes()]);
            b.insert(KEYS, &k, b"").unwrap();
        }
        if t.dead_lettered {
            b.insert(DEAD, &tenant_key(&t.tenant, &t.id), b"").unwrap();
        }
    }
    // `l` expired under the older hub: marked with the index alone, listed in `expired`.
    b.insert(GONE, b"tl", &4u64.to_be_bytes()).unwrap();
    b.insert(EXPIRED, &join(&[&4u64.to_be_bytes(), b"t", b"l"]), b"")
        .unwrap();
    b.remove(BY_TENANT, &tenant_key("t", "l")).unwrap();
    for t in [&dead, &older] {
        let f = join(&[&time_key(t.updated_at_ms), b"t", t.id.as_bytes()]);
        b.insert(BY_FINISH, &f, b"").unwrap();
    }
    h.recount().unwrap();
    assert_eq!(h.len(), 2);

    assert_eq!(h.expire(9, &History::cut(100, None)).unwrap(), 2);
    assert!(h.list("t", false, 10, |_| true).unwrap().is_empty());
    assert!(h.list("t", true, 10, |_| true).unwrap().is_empty());
    assert_eq!(h.task_at("d", 8).unwrap(), Some(TaskStatus::Succeeded));
    assert_eq!(h.task_at("d", 9).unwrap(), None);
    assert_eq!(
        h.keyed_at(false, "t", "key-d", 8).unwrap(),
        Some("d".into())
    );
    assert_eq!(h.keyed_at(false, "t", "key-d", 9).unwrap(), None);
    assert_eq!(h.len(), 0);

    assert_eq!(h.purge(4).unwrap(), 1, "what the older hub expired");
    assert_eq!(h.task("l").unwrap(), Lookup::Missing);
    assert!(matches!(h.task("d").unwrap(), Lookup::Expired { .. }));
    assert_eq!(h.purge(9).unwrap(), 2);
    let mut left = Vec::new();
    h.dump_to(&mut left).unwrap();
    assert!(left.is_empty(), "nothing left behind");
}

/// Every tree is empty once a record has been archived, expired and purged, and the
/// expiry and the purge read no record to do it.
#[test]
fn a_records_life_leaves_nothing_and_expiring_reads_no_record() {
    let h = History::default();
    let mut t = finished("a", 100);
    t.dead_lettered = true;
    t.idempotency_key = Some("k".into());
    h.archive(2, &[t], &[]).unwrap();
    // Expiry and purge work from the keys alone: a record that cannot be read does not
    // stop them.
    h.backend().insert(TASKS, b"a", b"not json").unwrap();
    assert_eq!(h.expire(5, &History::cut(100, None)).unwrap(), 1);
    assert_eq!(h.purge(5).unwrap(), 1);
    let mut left = Vec::new();
    h.dump_to(&mut left).unwrap();
    assert!(left.is_empty(), "nothing left behind");
}

/// A window of end times, newest first, filtered before the limit counts, across pages.
#[test]
fn tasks_ended_in_a_window_are_read_newest_first_and_filtered_before_the_limit() {
    let h = History::default();
    let tasks: Vec<TaskRecord> = (0..600)
        .map(|i| {
            let mut t = finished(&format!("t{i:04}"), 1_000 + i);
            if i % 2 == 1 {
                t.tenant = "other".into();
            }
            t
        })
        .collect();
    h.archive(5, &tasks, &[]).unwrap();
    let ids = |v: Vec<TaskRecord>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    // [1100, 1500): the newest first.
    let got = ids(h.ended_between(1_100, 1_500, 3, |_| true).unwrap());
    assert_eq!(got, ["t0499", "t0498", "t0497"]);
    // A filter that passes one in two still fills the limit, past a page of 256.
    let got = h.ended_between(0, 0, 300, |t| t.tenant == "t").unwrap();
    assert_eq!(got.len(), 300);
    assert!(got.iter().all(|t| t.tenant == "t"));
    assert_eq!(got[0].id, "t0598");
    // Nothing before the window's start.
    assert!(h.ended_between(2_000, 0, 10, |_| true).unwrap().is_empty());
    assert_eq!(h.ended_between(1_598, 0, 10, |_| true).unwrap().len(), 2);
}

/// What waits for a snapshot to be purged is counted as it expires, as a purge leaves it,
/// and again from disk when the store is opened (what `purge_sooner` looks at).
#[test]
fn tombstones_are_counted_until_purged_and_across_a_reopen() {
    let (_dir, db, bodies) = on_disk();
    let h = History::open(&db, &bodies, 0).unwrap();
    let records: Vec<_> = (0..5)
        .map(|i| finished(&format!("r{i}"), 100 + i))
        .collect();
    h.archive(3, &records, &[]).unwrap();
    assert_eq!(h.tombstones(), 0);
    assert_eq!(h.expire(7, &History::cut(101, None)).unwrap(), 2);
    assert_eq!(h.expire(9, &History::cut(102, None)).unwrap(), 1);
    // A replay of an expiry marks nothing new.
    assert_eq!(h.expire(9, &History::cut(102, None)).unwrap(), 0);
    assert_eq!(h.tombstones(), 3);
    assert_eq!(History::open(&db, &bodies, 0).unwrap().tombstones(), 3);
    assert_eq!(h.purge(8).unwrap(), 2, "only what a snapshot at 8 covers");
    assert_eq!(h.tombstones(), 1);
    assert_eq!(h.purge(9).unwrap(), 1);
    assert_eq!((h.tombstones(), h.len()), (0, 2));
    assert_eq!(History::open(&db, &bodies, 0).unwrap().tombstones(), 0);
}

/// An expiry a crash cut short (its mark written, the record's keys not yet removed) is
/// finished when the entry is applied again after the restart, and its tombstone is
/// counted once: by the count taken when the store opens, not again by the replay.
#[test]
fn a_replayed_expiry_cut_short_counts_its_tombstone_once() {
    let (_dir, db, bodies) = on_disk();
    let h = History::open(&db, &bodies, 0).unwrap();
    h.archive(3, &[finished("a", 100), finished("b", 200)], &[])
        .unwrap();
    let head = Header {
        archived_at: 3,
        dead: false,
        tenant: "t".into(),
        key: None,
    };
    let mut mark = 9u64.to_be_bytes().to_vec();
    mark.extend_from_slice(&head.encode());
    h.backend()
        .insert(GONE, &mark_key(KIND_TASK, b"a"), &mark)
        .unwrap();
    let h = History::open(&db, &bodies, 0).unwrap();
    assert_eq!((h.tombstones(), h.len()), (1, 2));
    assert_eq!(h.expire(9, &History::cut(100, None)).unwrap(), 0);
    assert_eq!((h.tombstones(), h.len()), (1, 1), "finished, counted once");
    assert_eq!(h.purge(9).unwrap(), 1);
    assert_eq!(h.tombstones(), 0);
}

/// A record's sled value holds no body: the body is in a file of bodies, read back whole,
/// also after the store is opened again. A file goes once no record points into it, and
/// one no record points into (a crash came before it was unlinked) goes when the store is
/// opened. The same archive replayed writes the body again and lets the old one go.
#[test]
fn bodies_live_in_files_that_go_once_no_record_points_into_them() {
    let (_dir, db, bodies) = on_disk();
    let file = |n: u64| bodies_dir(&bodies, 0).join(bodies::file_name(n));
    let h = History::open(&db, &bodies, 0).unwrap();
    h.backend().bodies().set_file_bytes(1);
    h.archive(3, &[finished("a", 100), finished("b", 100)], &[])
        .unwrap();
    h.archive(4, &[finished("c", 200)], &[]).unwrap();
    h.archive(5, &[finished("d", 300)], &[]).unwrap();
    let v = h.backend().get(TASKS, b"a").unwrap().unwrap();
    assert!(
        v.len() < 200,
        "a body in the index: {}",
        String::from_utf8_lossy(&v)
    );
    assert_eq!(h.backend().bodies().files(), [0, 1, 2]);
    assert_eq!(h.task("c").unwrap().found(), Some(finished("c", 200)));
    assert_eq!(h.task_at("a", 3).unwrap(), Some(TaskStatus::Succeeded));
    assert_eq!(h.task_at("a", 2).unwrap(), None);

    h.expire(6, &History::cut(100, None)).unwrap();
    assert_eq!(
        h.backend().bodies().files(),
        [0, 1, 2],
        "kept until purged: read as expired meanwhile, and sent in snapshots"
    );
    assert_eq!(h.purge(6).unwrap(), 2);
    assert_eq!(h.backend().bodies().files(), [1, 2]);

    h.sync().unwrap();
    drop(h);
    std::fs::write(file(0), b"left behind").unwrap();
    let h = History::open(&db, &bodies, 0).unwrap();
    assert_eq!(h.backend().bodies().files(), [1, 2]);
    assert_eq!(h.task("d").unwrap().found(), Some(finished("d", 300)));

    h.archive(4, &[finished("c", 200)], &[]).unwrap();
    assert_eq!(h.backend().bodies().files(), [2, 3]);
    assert_eq!(h.task("c").unwrap().found(), Some(finished("c", 200)));
    assert_eq!(h.len(), 2);

    // A body gone from under a record that is not expired is damage, and says so.
    std::fs::OpenOptions::new()
        .write(true)
        .open(file(3))
        .unwrap()
        .set_len(10)
        .unwrap();
    assert!(matches!(h.task("c"), Err(StoreError::Corrupt(_))));
    assert!(matches!(
        h.dump_to(&mut Vec::new()),
        Err(StoreError::Corrupt(_))
    ));
    // Expired, it is a tombstone: read as expired, and a snapshot carries it without it.
    h.expire(7, &History::cut(200, None)).unwrap();
    assert!(matches!(h.task("c").unwrap(), Lookup::Expired { .. }));
    h.dump_to(&mut Vec::new()).unwrap();
}

/// A snapshot carries records inline (what every hub reads, also one of an older build);
/// installing it puts their bodies in files of the next generation, and the replaced
/// generation's files go with its trees.
#[test]
fn a_snapshot_carries_records_inline_and_an_install_files_their_bodies_again() {
    let (_dir, db, bodies) = on_disk();
    let h = History::open(&db, &bodies, 0).unwrap();
    let mut keyed = finished("k", 150);
    keyed.idempotency_key = Some("key".into());
    h.archive(3, &[finished("a", 100), keyed.clone()], &[])
        .unwrap();
    h.expire(4, &History::cut(100, None)).unwrap();
    let mut dump = Vec::new();
    h.dump_to(&mut dump).unwrap();
    let inline = encode(&keyed);
    assert!(
        dump.windows(inline.len()).any(|w| w == inline),
        "the record inline"
    );

    let next = h.load_next_from(&mut &dump[..]).unwrap();
    assert_eq!(next.generation(), 1);
    assert_eq!(next.task("k").unwrap().found(), Some(keyed.clone()));
    assert!(matches!(next.task("a").unwrap(), Lookup::Expired { .. }));
    assert_eq!(
        next.keyed_at(false, "t", "key", 5).unwrap(),
        Some("k".into())
    );
    assert_eq!(next.task_at("k", 5).unwrap(), Some(TaskStatus::Succeeded));
    assert_eq!(next.task_at("a", 3).unwrap(), Some(TaskStatus::Succeeded));
    let v = next.backend().get(TASKS, b"k").unwrap().unwrap();
    assert!(
        v.len() < 200,
        "filed again: {}",
        String::from_utf8_lossy(&v)
    );
    let mut again = Vec::new();
    next.dump_to(&mut again).unwrap();
    assert_eq!(again, dump, "the same snapshot from the installed store");

    h.replace_with(next).remove().unwrap();
    assert!(!bodies.join("0").exists(), "the old generation's bodies");
    assert_eq!(h.task("k").unwrap().found(), Some(keyed.clone()));
    drop(h);
    // Opened again, it is the generation the install wrote.
    let h = History::open(&db, &bodies, 1).unwrap();
    assert_eq!((h.len(), h.tombstones()), (1, 1));
    let mut reopened = Vec::new();
    h.dump_to(&mut reopened).unwrap();
    assert_eq!(reopened, dump);
}

/// The installed store counts each body once: once its records are purged, the file the
/// install wrote goes.
#[test]
fn the_bodies_an_install_wrote_go_once_their_records_are_purged() {
    let (_dir, db, bodies) = on_disk();
    let h = History::open(&db, &bodies, 0).unwrap();
    h.archive(3, &[finished("a", 100), finished("k", 150)], &[])
        .unwrap();
    let mut dump = Vec::new();
    h.dump_to(&mut dump).unwrap();
    h.replace_with(h.load_next_from(&mut &dump[..]).unwrap())
        .remove()
        .unwrap();
    let files = || h.backend().bodies().files();
    assert_eq!(files(), [0]);
    h.backend().bodies().set_file_bytes(1);
    h.archive(6, &[finished("n", 400)], &[]).unwrap();
    assert_eq!(files(), [0, 1]);
    assert_eq!(h.expire(7, &History::cut(150, None)).unwrap(), 2);
    assert_eq!(h.purge(7).unwrap(), 2);
    assert_eq!(files(), [1]);
}

/// A power cut may lose the newest files while sled kept records that point into them.
/// Opened again, the store writes past every number a record names, so the bodies the
/// replay writes again are never in a file counted for the lost ones, and no file with
/// live bodies is removed.
#[test]
fn files_a_power_cut_lost_are_never_numbered_again() {
    let (_dir, db, bodies) = on_disk();
    let file = |n: u64| bodies_dir(&bodies, 0).join(bodies::file_name(n));
    let h = History::open(&db, &bodies, 0).unwrap();
    h.backend().bodies().set_file_bytes(1);
    h.archive(3, &[finished("a", 100)], &[]).unwrap();
    h.archive(4, &[finished("b", 200)], &[]).unwrap();
    h.archive(5, &[finished("c", 300)], &[]).unwrap();
    h.sync().unwrap();
    drop(h);
    std::fs::remove_file(file(1)).unwrap();
    std::fs::remove_file(file(2)).unwrap();

    let h = History::open(&db, &bodies, 0).unwrap();
    h.backend().bodies().set_file_bytes(1);
    assert!(matches!(h.task("b"), Err(StoreError::Corrupt(_))));
    // The replay writes them again.
    h.archive(4, &[finished("b", 200)], &[]).unwrap();
    h.archive(5, &[finished("c", 300)], &[]).unwrap();
    h.archive(6, &[finished("d", 400)], &[]).unwrap();
    assert_eq!(h.backend().bodies().files(), [0, 3, 4, 5]);
    for (id, ended) in [("a", 100), ("b", 200), ("c", 300), ("d", 400)] {
        assert_eq!(h.task(id).unwrap().found(), Some(finished(id, ended)));
    }
}

/// A value sent as another hub keeps it (where its body is on that hub's disk, no record)
/// reads as expired here rather than as whatever this hub's file holds at that place.
#[test]
fn a_body_place_from_another_hub_is_not_read_here() {
    let h = History::default();
    h.archive(3, &[finished("mine", 100)], &[]).unwrap();
    let theirs = h.backend().get(TASKS, b"mine").unwrap().unwrap();
    assert!(body_of(&theirs).is_some());
    // One record as `dump_to` frames it: tree, key, value.
    let mut dump = vec![TASKS as u8];
    dump.extend_from_slice(&6u32.to_be_bytes());
    dump.extend_from_slice(b"theirs");
    dump.extend_from_slice(&(theirs.len() as u32).to_be_bytes());
    dump.extend_from_slice(&theirs);
    let next = h.load_next_from(&mut &dump[..]).unwrap();
    assert!(matches!(
        next.task("theirs").unwrap(),
        Lookup::Expired { .. }
    ));
    assert_eq!(
        next.task_at("theirs", 5).unwrap(),
        Some(TaskStatus::Succeeded)
    );
}
