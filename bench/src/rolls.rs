//! Roll phases, all with the built-in client: rolls under load (keep-alive and close), roll
//! latency of an idle server, and max-requests recycles under load.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::Signal;

use crate::client::{self, LoadConfig, LoadReport, Mode};
use crate::server::{self, LogLine, Server};
use crate::Ctx;

/// Width of one point of the time series (and of the plot).
pub const BUCKET: Duration = Duration::from_millis(100);

/// How long one roll or one probe may take before the bench gives up on it.
const ROLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Load at the end of a roll run with no HUP, so the last roll's drain (connections close once
/// quiet for the SDK's `DRAIN_LINGER`, 1 s) happens under load too: this many HUP periods.
const TAIL_PERIODS: u32 = 2;

/// Latency of one roll, from the moment the bench sent the HUP.
#[derive(Debug, Clone, Copy)]
pub struct RollLatency {
    /// → `reloaded ... (generation N` in the master's log: every new worker is ready.
    pub ready_ms: Option<f64>,
    /// → the first response from a worker of the new generation.
    pub first_ms: Option<f64>,
}

/// A load run with events (HUPs, recycles) marked on its time line.
#[derive(Debug)]
pub struct EventRun {
    pub mode: Mode,
    /// The paced rate of the load, if it was paced.
    pub rate: Option<f64>,
    pub load: LoadReport,
    /// Seconds from the load's start.
    pub events: Vec<f64>,
    pub rolls: Vec<RollLatency>,
    /// `reload failed` / unexpected `died` lines in the log.
    pub problems: Vec<String>,
}

impl EventRun {
    /// "keep-alive", "close", "keep-alive paced at 20000 req/s".
    pub fn label(&self) -> String {
        match self.rate {
            Some(rate) => format!("{} paced at {rate:.0} req/s", self.mode.label()),
            None => self.mode.label().to_owned(),
        }
    }
}

/// A HUP every `roll_interval` under a `mode` load for `roll_time`, paced at `rate` req/s or
/// flat out.
pub fn under_load(
    ctx: &Ctx,
    angel: &Server,
    mode: Mode,
    rate: Option<f64>,
) -> anyhow::Result<EventRun> {
    let mark = angel.log.len();
    let cfg = LoadConfig {
        addr: angel.addr,
        connections: ctx.profile.connections,
        threads: ctx.client_threads,
        duration: ctx.profile.roll_time,
        mode,
        bucket: BUCKET,
        rate,
    };
    let stop = AtomicBool::new(false);
    let (load, hups) = std::thread::scope(|s| -> anyhow::Result<_> {
        let client = s.spawn(|| client::run(&cfg, &stop));
        let start = Instant::now();
        let mut hups = Vec::new();
        let mut next = start + ctx.profile.roll_interval;
        let tail = ctx.profile.roll_interval * TAIL_PERIODS;
        while next + tail <= start + ctx.profile.roll_time {
            // The load schedule, not a synchronisation: one HUP per period.
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let sent = Instant::now();
            angel.signal(Signal::SIGHUP)?;
            hups.push(sent);
            next += ctx.profile.roll_interval;
        }
        let load = client
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        Ok((load, hups))
    })?;
    let lines = angel.log.since(mark);
    let rolls = match_rolls(&hups, &lines, &load);
    Ok(EventRun {
        mode,
        rate,
        events: offsets(&hups, load.started),
        rolls,
        problems: problems(&lines),
        load,
    })
}

/// `n` rolls of an idle server, one at a time: HUP, wait for `reloaded`, probe until a new
/// worker answers, wait until the old workers exited.
pub fn idle(ctx: &Ctx, angel: &mut Server) -> anyhow::Result<Vec<RollLatency>> {
    let mut out = Vec::new();
    for _ in 0..ctx.profile.idle_rolls {
        let old: HashSet<u32> = angel.serving_pids().into_iter().collect();
        let mark = angel.log.len();
        let sent = Instant::now();
        angel.signal(Signal::SIGHUP)?;
        let mut first_ms = None;
        let deadline = sent + ROLL_TIMEOUT;
        while first_ms.is_none() {
            if Instant::now() > deadline {
                bail!("no response from a new worker {ROLL_TIMEOUT:?} after a HUP");
            }
            let new = forked_since(&angel.log.since(mark));
            if let Ok(pid) = crate::http1::probe_pid(angel.addr, ROLL_TIMEOUT) {
                if new.contains(&pid) {
                    first_ms = Some(ms(sent.elapsed()));
                }
            }
        }
        let (_, ready) = angel
            .wait_line(mark, |l| {
                l.contains("] reloaded ") || l.contains("reload failed")
            })
            .context("waiting for the roll to finish")?;
        if ready.text.contains("reload failed") {
            bail!("roll failed: {}", ready.text);
        }
        for pid in old {
            let exited = format!("] worker {pid} ");
            angel
                .wait_line(mark, |l| l.contains(&exited))
                .context("waiting for an old worker to exit")?;
        }
        out.push(RollLatency {
            ready_ms: Some(ms(ready.at.duration_since(sent))),
            first_ms,
        });
    }
    Ok(out)
}

/// A `mode` load on an angel-host started with `--max-requests`, until `recycles` replacement
/// workers were forked (or the time cap).
pub fn recycles(ctx: &Ctx, angel: &Server, mode: Mode) -> anyhow::Result<EventRun> {
    let mark = angel.log.len();
    let rate = None;
    let cfg = LoadConfig {
        addr: angel.addr,
        connections: ctx.profile.connections,
        threads: ctx.client_threads,
        duration: ctx.profile.recycle_cap,
        mode,
        bucket: BUCKET,
        rate,
    };
    let stop = AtomicBool::new(false);
    let load = std::thread::scope(|s| -> anyhow::Result<_> {
        let client = s.spawn(|| client::run(&cfg, &stop));
        let deadline = Instant::now() + ctx.profile.recycle_cap;
        let mut from = mark;
        let mut forked = 0;
        while forked < ctx.profile.recycles {
            let left = deadline.saturating_duration_since(Instant::now());
            match angel
                .log
                .wait_for(from, left, |l| l.contains("forked worker["))
            {
                Some((at, _)) => {
                    forked += 1;
                    from = at + 1;
                }
                None => break,
            }
        }
        stop.store(true, Ordering::Relaxed);
        client
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    })?;
    let lines = angel.log.since(mark);
    let forks: Vec<Instant> = lines
        .iter()
        .filter(|l| l.text.contains("forked worker["))
        .map(|l| l.at)
        .collect();
    Ok(EventRun {
        mode,
        rate,
        events: offsets(&forks, load.started),
        rolls: Vec::new(),
        problems: problems(&lines),
        load,
    })
}

/// Pairs each HUP with the first `reloaded` line and the first new-generation response after it
/// (and before the next HUP).
fn match_rolls(hups: &[Instant], lines: &[LogLine], load: &LoadReport) -> Vec<RollLatency> {
    hups.iter()
        .enumerate()
        .map(|(i, &sent)| {
            let until = hups.get(i + 1).copied();
            let in_window = |l: &&LogLine| l.at >= sent && until.is_none_or(|u| l.at < u);
            let window: Vec<LogLine> = lines.iter().filter(in_window).cloned().collect();
            let ready_ms = window
                .iter()
                .find(|l| l.text.contains("] reloaded "))
                .map(|l| ms(l.at.duration_since(sent)));
            let first_ms = forked_since(&window)
                .iter()
                .filter_map(|pid| load.pids.get(pid))
                .map(|s| s.first)
                .filter(|&t| t >= sent)
                .min()
                .map(|t| ms(t.duration_since(sent)));
            RollLatency { ready_ms, first_ms }
        })
        .collect()
}

/// Pids of the `forked worker[PID]` lines.
fn forked_since(lines: &[LogLine]) -> HashSet<u32> {
    lines
        .iter()
        .filter_map(|l| server::between(&l.text, "forked worker[", "]"))
        .collect()
}

/// Lines that say a roll failed or a worker died unexpectedly.
fn problems(lines: &[LogLine]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.text.contains("reload failed") || l.text.contains(" died"))
        .map(|l| l.text.clone())
        .collect()
}

fn offsets(events: &[Instant], start: Instant) -> Vec<f64> {
    events
        .iter()
        .map(|e| e.saturating_duration_since(start).as_secs_f64())
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
