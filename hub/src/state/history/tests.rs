use super::*;
use crate::state::TaskRecord;
use serde_json::json;

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
