//! Reading `angel-host status --json`: [`status`] into the typed [`Status`], [`status_value`]
//! for tests that check the JSON itself, and [`wait_settled`].

use std::cell::RefCell;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::ops::ctl;
use crate::{poll, Host, WAIT};

/// The fields of `status --json` the tests look at (others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// The master's pid.
    pub pid: i32,
    /// The serving generation.
    pub generation: u64,
    /// Full SHA-256 of the serving library.
    pub sha256: Option<String>,
    /// A roll is under way.
    pub rolling: bool,
    /// The master is stopping.
    pub stopping: bool,
    /// The worker count the master aims for.
    pub configured_workers: usize,
    /// Every worker (probes excluded).
    pub workers: Vec<WorkerStatus>,
    /// The JSON as printed, for messages.
    #[serde(skip)]
    pub raw: String,
}

/// One worker in [`Status`].
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerStatus {
    /// Its pid.
    pub pid: i32,
    /// Its slot.
    pub slot: u64,
    /// Its generation.
    pub generation: u64,
    /// `starting`, `ready`, `draining`, `killed`.
    pub state: String,
    /// Requests it served (from its heartbeats, about 1 s stale).
    pub requests: u64,
}

/// `angel-host status --json --pidfile <pidfile>` as JSON; panics with the command's output
/// unless it succeeded and printed JSON.
pub fn status_value(pidfile: &Path) -> Value {
    let out = ctl(pidfile, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status --json failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {:?}", out.stdout))
}

/// `angel-host status --json --pidfile <pidfile>`, typed.
pub fn status(pidfile: &Path) -> Status {
    Status::from_value(status_value(pidfile))
}

impl Status {
    /// Reads a parsed `status --json`; panics naming what does not fit.
    pub fn from_value(value: Value) -> Status {
        let raw = value.to_string();
        let mut status: Status = serde_json::from_value(value)
            .unwrap_or_else(|e| panic!("unreadable status ({e}): {raw}"));
        status.raw = raw;
        status
    }

    /// The workers whose `state` is `state`, as `(pid, slot, generation)`.
    pub fn workers_in(&self, state: &str) -> Vec<(i32, u64, u64)> {
        self.workers
            .iter()
            .filter(|w| w.state == state)
            .map(|w| (w.pid, w.slot, w.generation))
            .collect()
    }

    /// Settled: no roll under way, exactly `workers` workers, all `ready`, all of the serving
    /// generation (nothing starting, draining or killed left).
    pub fn is_settled(&self, workers: usize) -> bool {
        !self.rolling
            && !self.stopping
            && self.workers.len() == workers
            && self
                .workers
                .iter()
                .all(|w| w.state == "ready" && w.generation == self.generation)
    }
}

/// Polls `status --json` until it [is settled](Status::is_settled) (bounded by [`WAIT`]).
pub fn wait_settled(host: &Host, workers: usize) -> Status {
    let last = RefCell::new(String::new());
    poll(
        WAIT,
        &format!("status to settle to {workers} ready workers of one generation"),
        || {
            format!(
                "last status: {}\n--- master stderr ---\n{}",
                last.borrow(),
                host.log()
            )
        },
        || {
            let s = status(host.pidfile());
            if s.is_settled(workers) {
                return Some(s);
            }
            *last.borrow_mut() = s.raw;
            None
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_is_read() {
        let line = r#"{"pid":26990,"uptime_secs":1.68,"generation":2,"lib":"/t/a \"b\"/x.so","library":null,"sha256":"1300ab","listening":["127.0.0.1:38595"],"rolling":false,"stopping":false,"configured_workers":2,"workers":[{"pid":26994,"slot":0,"generation":2,"state":"ready","age_secs":1.6e0,"requests":0},{"pid":26995,"slot":1,"generation":1,"state":"draining","age_secs":1.67,"requests":3}]}"#;
        let s = Status::from_value(serde_json::from_str(line).unwrap());
        assert_eq!((s.pid, s.generation), (26990, 2));
        assert_eq!(s.sha256.as_deref(), Some("1300ab"));
        assert_eq!(s.workers.len(), 2);
        assert_eq!(s.workers[1].state, "draining");
        assert_eq!(s.workers_in("ready"), [(26994, 0, 2)]);
        assert!(!s.is_settled(2));
    }
}
