//! Resident memory of processes, from `/proc/<pid>/status` and `/proc/<pid>/smaps_rollup`.
//!
//! RSS counts every resident page the process maps, including code pages it shares with other
//! processes (angel-host's master and workers are one binary; a generation's workers map one
//! snapshot). PSS divides shared pages among their sharers; USS counts the private pages only,
//! what the process really adds.

/// Resident memory of one process, in KiB.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rss {
    pub total_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub pss_kib: u64,
    pub uss_kib: u64,
}

impl Rss {
    pub fn mib(&self) -> f64 {
        self.total_kib as f64 / 1024.0
    }
}

/// `VmRSS`, `RssAnon` and `RssFile` of `pid`; `None` if it is gone.
pub fn rss(pid: u32) -> Option<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Some(Rss {
        total_kib: field(&status, "VmRSS:"),
        anon_kib: field(&status, "RssAnon:"),
        file_kib: field(&status, "RssFile:"),
        pss_kib: field(&rollup, "Pss:"),
        uss_kib: field(&rollup, "Private_Clean:") + field(&rollup, "Private_Dirty:"),
    })
}

/// The `name:` line's value in kB.
fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The mean of the resident sets of `pids` that still exist.
pub fn mean_rss(pids: &[u32]) -> Rss {
    let all: Vec<Rss> = pids.iter().filter_map(|p| rss(*p)).collect();
    let n = all.len().max(1) as u64;
    Rss {
        total_kib: all.iter().map(|r| r.total_kib).sum::<u64>() / n,
        anon_kib: all.iter().map(|r| r.anon_kib).sum::<u64>() / n,
        file_kib: all.iter().map(|r| r.file_kib).sum::<u64>() / n,
        pss_kib: all.iter().map(|r| r.pss_kib).sum::<u64>() / n,
        uss_kib: all.iter().map(|r| r.uss_kib).sum::<u64>() / n,
    }
}
