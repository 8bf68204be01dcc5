//! angel-bench: benchmarks and load proofs for angel-host.
//!
//! # Theory of operation
//!
//! One run starts both servers side by side and keeps them up: angel-host serving
//! `examples/hello` with W workers, and `plain-hyper` (this crate's second binary: the same
//! handler on hyper with W processes, each with its own `SO_REUSEPORT` socket and a
//! current-thread runtime — an angel worker minus angel). Then, in order:
//!
//! 1. **A/B, steady**: rounds of the same keep-alive load on plain then angel (ABBA order, so
//!    drift of a shared machine hits both sides alike); the ratio is the median of the per-round
//!    ratios. wrk if installed (a C load generator cheaper per request than ours, so more of
//!    the two cores go to the servers), else the built-in client.
//! 2. **memory** of the master, the workers and the plain processes, warm;
//!    **balance**: a `Connection: close` load counts responses per worker pid (one connection
//!    per request, so responses per pid = accepted connections per worker).
//! 3. **A/B under a continuous roll**: as 1, with a HUP to angel-host every 500 ms meanwhile.
//! 4. **rolls under load**, keep-alive and close clients flat out, and keep-alive paced at a
//!    rate that leaves the cores unsaturated (built-in client): a HUP every 500 ms for ~a minute
//!    each; every failed request counted by class and by 100 ms bucket; roll
//!    latency from the master's log (`reloaded` line, timestamped on arrival) and from the
//!    first response carrying a new worker's pid.
//! 5. **idle rolls**, one at a time, probing until a new worker answers.
//! 6. **recycles**: a second angel-host with `--max-requests`, under each client mode, until
//!    enough replacement workers were forked.
//!
//! Results go to `results.md` (the table for BENCHMARKS.md), `summary.txt` (key=value) and
//! `rolls.svg` (requests/s and failures over time, events marked).

#![warn(clippy::unwrap_used, clippy::undocumented_unsafe_blocks)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod ab;
pub mod cli;
pub mod client;
pub mod cpu;
pub mod http1;
pub mod matrix;
pub mod mem;
pub mod plot;
pub mod report;
pub mod rolls;
pub mod server;
pub mod shapes;
pub mod stats;
pub mod wrk;

use std::path::PathBuf;

use anyhow::{bail, Context as _};

use crate::cli::{Cli, LoadGen, Profile};
use crate::client::Mode;
use crate::report::Results;
use crate::server::{AngelConfig, Server};

/// What every phase needs.
pub struct Ctx {
    pub profile: Profile,
    pub client_threads: usize,
    pub use_wrk: bool,
    pub workers: usize,
    pub host_bin: PathBuf,
    pub lib: PathBuf,
    pub plain_bin: PathBuf,
}

/// Runs the benchmark the flags describe and writes its results.
pub fn run(cli: &Cli) -> anyhow::Result<Results> {
    let mut profile = if cli.smoke {
        Profile::smoke()
    } else {
        Profile::full()
    };
    if let Some(c) = cli.connections {
        profile.connections = c;
    }
    if let Some(n) = cli.ab_rounds {
        profile.ab_rounds = n;
    }
    if let Some(secs) = cli.ab_secs {
        profile.ab_time = std::time::Duration::from_secs(secs);
    }
    let use_wrk = match cli.load {
        LoadGen::Rust => false,
        LoadGen::Wrk if !wrk::available() => bail!("--load wrk: no wrk on the PATH"),
        LoadGen::Wrk => true,
        LoadGen::Auto => !cli.smoke && wrk::available(),
    };
    let ctx = Ctx {
        profile,
        client_threads: cli.client_threads,
        use_wrk,
        workers: cli.workers,
        host_bin: existing(cli.host_bin.clone(), "angel-host")?,
        lib: existing(cli.lib.clone(), "libhello.so")?,
        plain_bin: existing(cli.plain_bin.clone(), "plain-hyper")?,
    };
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let mut results = Results {
        profile: ctx.profile.name.to_owned(),
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        load_gen: if use_wrk {
            format!("wrk -t{} (keep-alive)", ctx.client_threads)
        } else {
            format!(
                "built-in client, {} threads (keep-alive)",
                ctx.client_threads
            )
        },
        workers: ctx.workers,
        connections: ctx.profile.connections,
        roll_interval_ms: ctx.profile.roll_interval.as_millis(),
        max_requests: ctx.profile.max_requests,
        ..Results::default()
    };
    eprintln!("angel-bench: {} ({})", results.machine, results.load_gen);

    let mut angel = Server::angel(&angel_config(&ctx, 0, 0))?;
    let plain = Server::plain(&ctx.plain_bin, ctx.workers, false)?;
    let minimal = Server::plain(&ctx.plain_bin, ctx.workers, true)?;
    eprintln!(
        "warm-up: angel-host {}, plain-hyper {}, minimal http1 {}",
        angel.addr, plain.addr, minimal.addr
    );
    ab::measure(&ctx, plain.addr, ctx.profile.ab_time)?;
    ab::measure(&ctx, minimal.addr, ctx.profile.ab_time)?;
    ab::measure(&ctx, angel.addr, ctx.profile.ab_time)?;

    eprintln!(
        "A/B steady, {} rounds of {:?}",
        ctx.profile.ab_rounds, ctx.profile.ab_time
    );
    results.ab = ab::rounds(
        &ctx,
        &angel,
        &plain,
        Some(&minimal),
        ctx.profile.ab_rounds,
        None,
    )?;
    minimal.stop()?;
    results.memory = ab::memory(&angel, &plain);
    eprintln!(
        "balance (close client, {:?} each)",
        ctx.profile.balance_time
    );
    results.balance_angel = ab::balance(&ctx, &angel)?;
    results.balance_plain = ab::balance(&ctx, &plain)?;

    if ctx.profile.roll_ab_rounds > 0 {
        eprintln!(
            "A/B with angel-host rolling every {:?}",
            ctx.profile.roll_interval
        );
        let every = Some(ctx.profile.roll_interval);
        results.roll_ab = ab::rounds(
            &ctx,
            &angel,
            &plain,
            None,
            ctx.profile.roll_ab_rounds,
            every,
        )?;
    }
    plain.stop()?;

    let mut roll_loads = vec![(Mode::KeepAlive, None), (Mode::Close, None)];
    if let Some(rate) = ctx.profile.paced_rate {
        roll_loads.push((Mode::KeepAlive, Some(rate)));
    }
    for (mode, rate) in roll_loads {
        let paced = rate.map_or_else(String::new, |r| format!(" paced at {r:.0} req/s"));
        eprintln!(
            "rolls under {}{paced} load for {:?}",
            mode.label(),
            ctx.profile.roll_time
        );
        let run = rolls::under_load(&ctx, &angel, mode, rate)?;
        eprintln!(
            "  {} rolls, {} ok, failed {}",
            run.rolls.len(),
            run.load.ok,
            run.load.failures
        );
        results.roll_runs.push(run);
    }
    eprintln!("{} idle rolls", ctx.profile.idle_rolls);
    results.idle = rolls::idle(&ctx, &mut angel)?;
    angel.stop()?;

    let cfg = angel_config(
        &ctx,
        ctx.profile.max_requests,
        ctx.profile.max_requests_jitter,
    );
    let recycling = Server::angel(&cfg)?;
    for mode in [Mode::KeepAlive, Mode::Close] {
        eprintln!(
            "recycles (--max-requests {}) under {} load",
            cfg.max_requests,
            mode.label()
        );
        let run = rolls::recycles(&ctx, &recycling, mode)?;
        eprintln!(
            "  {} recycles, {} ok, failed {}",
            run.events.len(),
            run.load.ok,
            run.load.failures
        );
        results.recycle_runs.push(run);
    }
    recycling.stop()?;

    write_outputs(cli, &results)?;
    Ok(results)
}

fn angel_config(ctx: &Ctx, max_requests: u64, jitter: u64) -> AngelConfig<'_> {
    AngelConfig {
        host_bin: &ctx.host_bin,
        lib: &ctx.lib,
        workers: ctx.workers,
        max_requests,
        max_requests_jitter: jitter,
    }
}

fn write_outputs(cli: &Cli, results: &Results) -> anyhow::Result<()> {
    let md = results.markdown();
    std::fs::write(cli.out.join("results.md"), &md)?;
    std::fs::write(cli.out.join("summary.txt"), results.summary())?;
    let mut panels = Vec::new();
    for run in &results.roll_runs {
        let title = format!(
            "{} client, a HUP every {} ms ({} rolls): {} failed of {}",
            run.label(),
            results.roll_interval_ms,
            run.events.len(),
            run.load.failures.total(),
            run.load.ok + run.load.failures.total()
        );
        panels.push((title, run));
    }
    for run in &results.recycle_runs {
        let title = format!(
            "{} client, --max-requests {} ({} recycles): {} failed of {}",
            run.label(),
            results.max_requests,
            run.events.len(),
            run.load.failures.total(),
            run.load.ok + run.load.failures.total()
        );
        panels.push((title, run));
    }
    plot::rolls_svg(&cli.out.join("rolls.svg"), &panels)?;
    println!("{md}");
    eprintln!(
        "wrote {}/results.md, summary.txt, rolls.svg",
        cli.out.display()
    );
    Ok(())
}

/// `path`, or `name` beside this executable; must exist.
fn existing(path: Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    let path = path.unwrap_or_else(|| server::sibling(name));
    if !path.exists() {
        bail!(
            "{} not found (build it first, or pass its path)",
            path.display()
        );
    }
    Ok(path)
}

/// CPU model, cores, kernel and load average, for the report.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{model}, {cores} cores, Linux {}, load average at start {}",
        kernel.trim(),
        load.join(" ")
    )
}
