//! Machine load for heartbeats: whole-machine CPU use, sampled by sysinfo.

use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Load {
    sys: Arc<Mutex<sysinfo::System>>,
}

impl Load {
    pub fn new() -> Self {
        let mut sys = sysinfo::System::new();
        sys.refresh_cpu_usage();
        Self {
            sys: Arc::new(Mutex::new(sys)),
        }
    }

    /// CPU use since the previous call, 0..100.
    pub fn cpu_percent(&self) -> f64 {
        let mut sys = self.sys.lock().expect("sysinfo lock");
        sys.refresh_cpu_usage();
        f64::from(sys.global_cpu_usage())
    }
}

impl Default for Load {
    fn default() -> Self {
        Self::new()
    }
}
