//! A/B phases: angel-host vs plain hyper, interleaved — throughput and latency steady and under a
//! continuous roll, balance over the workers, and memory.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::client::{self, Failures, LoadConfig, Mode};
use crate::mem::{self, Rss};
use crate::server::Server;
use crate::{cpu, wrk, Ctx};

/// One measurement of one server.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub rps: f64,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failures: Failures,
    /// CPU time of the server's processes per request (µs), for the steady A/B only.
    pub cpu_us_per_request: Option<f64>,
}

/// One interleaved round: the same load on each server, back to back.
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub plain: Measured,
    pub angel: Measured,
    /// The minimal reference (`plain-hyper --http1`), in the steady A/B only.
    pub minimal: Option<Measured>,
    /// HUPs sent to angel-host during its side of the round (0 for the steady A/B).
    pub hups: usize,
}

/// Responses per worker pid under a `Connection: close` load (one connection per request).
#[derive(Debug, Clone, Default)]
pub struct Balance {
    pub per_worker: Vec<u64>,
}

impl Balance {
    pub fn ratio(&self) -> f64 {
        let max = self.per_worker.iter().copied().max().unwrap_or(0);
        let min = self.per_worker.iter().copied().min().unwrap_or(0);
        max as f64 / min.max(1) as f64
    }
}

/// Resident memory after the warm-up and the A/B load.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    pub master: Rss,
    pub worker: Rss,
    pub plain: Rss,
    pub plain_parent: Rss,
}

/// Measures `addr` for `time` with the A/B load generator (keep-alive).
pub fn measure(ctx: &Ctx, addr: SocketAddr, time: Duration) -> anyhow::Result<Measured> {
    if ctx.use_wrk {
        let r = wrk::run(
            addr,
            ctx.client_threads,
            ctx.profile.connections,
            time,
            false,
        )?;
        return Ok(Measured {
            rps: r.rps,
            requests: r.requests,
            p50_ms: r.p50_ms,
            p99_ms: r.p99_ms,
            failures: r.failures,
            cpu_us_per_request: None,
        });
    }
    let cfg = LoadConfig {
        addr,
        connections: ctx.profile.connections,
        threads: ctx.client_threads,
        duration: time,
        mode: Mode::KeepAlive,
        bucket: Duration::from_millis(100),
        rate: None,
    };
    let r = client::run(&cfg, &AtomicBool::new(false))?;
    Ok(Measured {
        rps: r.rps(),
        requests: r.ok + r.failures.total(),
        p50_ms: r.latency_ms(0.5),
        p99_ms: r.latency_ms(0.99),
        failures: r.failures,
        cpu_us_per_request: None,
    })
}

/// [`measure`], plus the CPU time the server's processes (master or parent included) used per
/// request meanwhile.
fn measure_cpu(ctx: &Ctx, server: &Server, time: Duration) -> anyhow::Result<Measured> {
    let mut pids = server.serving_pids();
    pids.push(server.pid());
    let before = cpu::total(&pids);
    let mut m = measure(ctx, server.addr, time)?;
    let used = cpu::total(&pids).saturating_sub(before);
    m.cpu_us_per_request = Some(used.as_secs_f64() * 1e6 / m.requests.max(1) as f64);
    Ok(m)
}

/// Interleaved rounds (ABBA order; with `minimal`, the three servers in an order rotated every
/// round); with `roll`, angel-host gets a HUP every `roll` meanwhile.
pub fn rounds(
    ctx: &Ctx,
    angel: &Server,
    plain: &Server,
    minimal: Option<&Server>,
    n: usize,
    roll: Option<Duration>,
) -> anyhow::Result<Vec<Round>> {
    let time = ctx.profile.ab_time;
    let mut out = Vec::new();
    for i in 0..n {
        let mut round = Round::default();
        let measure_angel = |round: &mut Round| -> anyhow::Result<()> {
            match roll {
                None => round.angel = measure_cpu(ctx, angel, time)?,
                Some(every) => {
                    let (m, hups) = while_rolling(angel, every, || measure(ctx, angel.addr, time))?;
                    round.angel = m;
                    round.hups = hups;
                }
            }
            Ok(())
        };
        if let Some(minimal) = minimal {
            for k in 0..3 {
                match (i + k) % 3 {
                    0 => round.plain = measure_cpu(ctx, plain, time)?,
                    1 => round.minimal = Some(measure_cpu(ctx, minimal, time)?),
                    _ => measure_angel(&mut round)?,
                }
            }
        } else if i % 2 == 0 {
            round.plain = measure_cpu(ctx, plain, time)?;
            measure_angel(&mut round)?;
        } else {
            measure_angel(&mut round)?;
            round.plain = measure_cpu(ctx, plain, time)?;
        }
        eprintln!(
            "  round {}: plain {:.0} req/s, angel {:.0} req/s (ratio {:.3}){}",
            i + 1,
            round.plain.rps,
            round.angel.rps,
            round.angel.rps / round.plain.rps.max(1.0),
            if roll.is_some() {
                format!(
                    ", {} HUPs, angel failures {}",
                    round.hups, round.angel.failures
                )
            } else {
                String::new()
            }
        );
        out.push(round);
    }
    Ok(out)
}

/// Runs `f` while a thread sends `angel` a HUP every `every`; returns f's result and the HUPs.
pub fn while_rolling<T>(
    angel: &Server,
    every: Duration,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, usize)> {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let hupper = s.spawn(|| -> anyhow::Result<usize> {
            let mut hups = 0;
            let mut next = Instant::now() + every;
            while !done.load(Ordering::Relaxed) {
                // The load schedule, not a synchronisation: one HUP per period.
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                if done.load(Ordering::Relaxed) {
                    break;
                }
                angel.signal(Signal::SIGHUP)?;
                hups += 1;
                next += every;
            }
            Ok(hups)
        });
        let result = f();
        done.store(true, Ordering::Relaxed);
        let hups = hupper
            .join()
            .map_err(|_| anyhow::anyhow!("the HUP thread panicked"))??;
        Ok((result?, hups))
    })
}

/// Responses per pid of `server`'s serving processes under a `Connection: close` load.
pub fn balance(ctx: &Ctx, server: &Server) -> anyhow::Result<Balance> {
    let cfg = LoadConfig {
        addr: server.addr,
        connections: ctx.profile.connections,
        threads: ctx.client_threads,
        duration: ctx.profile.balance_time,
        mode: Mode::Close,
        bucket: Duration::from_millis(100),
        rate: None,
    };
    let report = client::run(&cfg, &AtomicBool::new(false))?;
    let serving = server.serving_pids();
    let per_worker = serving
        .iter()
        .map(|pid| report.pids.get(pid).map_or(0, |s| s.responses))
        .collect();
    Ok(Balance { per_worker })
}

/// Resident memory of the master, the workers and the plain processes, now.
pub fn memory(angel: &Server, plain: &Server) -> Memory {
    Memory {
        master: mem::rss(angel.pid()).unwrap_or_default(),
        worker: mem::mean_rss(&angel.serving_pids()),
        plain: mem::mean_rss(&plain.serving_pids()),
        plain_parent: mem::rss(plain.pid()).unwrap_or_default(),
    }
}
