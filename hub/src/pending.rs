//! Why queued tasks wait: the scheduler's last word on each, kept in the leader's memory
//! and shown by GetTask and ListTasks.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Why queued tasks are waiting, kept in memory by the leader.
#[derive(Clone, Default)]
pub struct PendingReasons(Arc<Mutex<HashMap<String, String>>>);

impl PendingReasons {
    pub fn set_many(&self, reasons: Vec<(String, String)>) {
        let mut m = self.0.lock().expect("pending lock");
        for (id, r) in reasons {
            m.insert(id, r);
        }
    }
    pub fn clear(&self, task_id: &str) {
        self.0.lock().expect("pending lock").remove(task_id);
    }
    pub fn get(&self, task_id: &str) -> Option<String> {
        self.0.lock().expect("pending lock").get(task_id).cloned()
    }
}
