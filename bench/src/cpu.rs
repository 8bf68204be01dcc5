//! CPU time of processes, from `/proc/<pid>/task/<tid>/schedstat` (nanoseconds on a CPU, all
//! threads): a per-request cost that a noisy shared machine disturbs far less than requests/s.

use std::time::Duration;

/// CPU time `pid` has used so far (all its threads); zero if it is gone.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// CPU time of all `pids` so far.
pub fn total(pids: &[u32]) -> Duration {
    pids.iter().map(|p| cpu_time(*p)).sum()
}
