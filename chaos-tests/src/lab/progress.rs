//! Live progress on stderr: one line per step with the time since the start.

use std::time::Instant;

#[derive(Clone)]
pub struct Progress {
    start: Instant,
    enabled: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress {
            start: Instant::now(),
            enabled,
        }
    }

    pub fn step(&self, what: &str) {
        if self.enabled {
            eprintln!("[{:>8.3}s] {what}", self.start.elapsed().as_secs_f64());
        }
    }
}
