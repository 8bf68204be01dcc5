//! The loss matrix: traffic shapes × operator events, every request counted.
//!
//! Each cell starts a fresh angel-host (release build, 2 workers), runs one traffic shape flat
//! out on it, drives one kind of event N times, and counts:
//! - **sent**: requests (echo messages, streams) written, each once, plus connects that failed;
//! - **lost**: sent and not answered — any read/write error, timeout, bad status, cut stream or
//!   wrong echo after the request was written;
//! - **retried**: sends again of what a protocol's goodbye refused unprocessed (HTTP/2 GOAWAY,
//!   echo's `BYE`, a WebSocket Close 1001; see [`crate::shapes`] for the rule). HTTP/1 clients
//!   retry nothing;
//! - **refused**: connects that failed. During rolls, recycles and resizes a refused connect is
//!   lost too (nothing should be refused while the server runs); during a graceful stop it is
//!   the expected answer to a request that arrives after the stop began.
//!
//! Events: `rolls` (HUP, wait for `reloaded`, N times), `recycles` (`--max-requests M`, until
//! N workers were forked as replacements), `resize` (TTIN then TTOU, each waited for, N pairs),
//! `stop` (TERM under load; the load continues until the master exited).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;

use crate::client::{self, LoadConfig, Mode};
use crate::server::{AngelConfig, Server};
use crate::shapes::{self, Counted};

/// One traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    Http1KeepAlive,
    Http1Close,
    /// Several HTTP/2 connections, each held for the run, ~10 streams in flight on each.
    Http2Busy,
    /// HTTP/2, one stream at a time per connection.
    Http2Single,
    /// Long responses: `examples/ticker`'s bounded `/count` stream.
    LongStream,
    /// A WebSocket echo (`examples/axum` `/ws`).
    WebSocket,
    RawTcp,
}

impl Traffic {
    pub const ALL: [Traffic; 7] = [
        Traffic::Http1KeepAlive,
        Traffic::Http1Close,
        Traffic::Http2Busy,
        Traffic::Http2Single,
        Traffic::LongStream,
        Traffic::WebSocket,
        Traffic::RawTcp,
    ];

    pub fn label(self, n: &Counts) -> String {
        match self {
            Traffic::Http1KeepAlive => "HTTP/1 keep-alive, flat out".into(),
            Traffic::Http1Close => "HTTP/1 Connection: close".into(),
            Traffic::Http2Busy => format!(
                "HTTP/2 multiplexed, {} connections × {} streams",
                n.h2_connections, n.h2_streams
            ),
            Traffic::Http2Single => "HTTP/2 one stream at a time".into(),
            Traffic::LongStream => format!(
                "long responses (examples/ticker, {} lines × {} ms)",
                shapes::stream::LINES,
                shapes::stream::LINE_MS
            ),
            Traffic::WebSocket => "WebSocket echo (examples/axum /ws)".into(),
            Traffic::RawTcp => "raw TCP echo (examples/echo, BYE)".into(),
        }
    }

    /// `--max-requests` for its recycles: long responses (~100 ms each) recycle after fewer,
    /// so 1000 recycles take a minute, not ten. Not WebSocket sessions, although each is only
    /// one request: a worker that retires after fewer upgrades than it has sessions open
    /// (32 clients on 2 workers) refuses the resent message again and again on its
    /// successors, and the client gives up after `MAX_RETRIES` (measured: 597 of 47 423 lost
    /// with `--max-requests 10`) — a limit of the configuration, not of the drain.
    pub fn max_requests(self, n: &Counts) -> u64 {
        match self {
            Traffic::LongStream => n.stream_max_requests,
            _ => n.max_requests,
        }
    }
}

/// One kind of operator event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Rolls,
    Recycles,
    Resize,
    Stop,
}

impl Event {
    pub const ALL: [Event; 4] = [Event::Rolls, Event::Recycles, Event::Resize, Event::Stop];

    pub fn label(self, traffic: Traffic, n: &Counts) -> String {
        match self {
            Event::Rolls => format!("{} rolls", n.rolls),
            Event::Recycles => format!(
                "{} recycles (--max-requests {})",
                n.recycles,
                traffic.max_requests(n)
            ),
            Event::Resize => format!("{} TTIN+TTOU pairs", n.resizes),
            Event::Stop => "graceful stop".into(),
        }
    }
}

/// How many of each event a cell drives.
#[derive(Debug, Clone)]
pub struct Counts {
    pub rolls: usize,
    pub recycles: usize,
    pub max_requests: u64,
    pub resizes: usize,
    pub connections: usize,
    /// `--max-requests` for the long responses.
    pub stream_max_requests: u64,
    pub h2_connections: usize,
    pub h2_streams: usize,
}

/// What one cell saw.
#[derive(Debug, Clone)]
pub struct Cell {
    pub traffic: Traffic,
    pub event: Event,
    pub sent: u64,
    pub lost: u64,
    pub refused: u64,
    pub retried: u64,
    pub secs: f64,
    pub samples: Vec<String>,
}

impl Cell {
    /// Lost by the rule of its event (refused counts as lost except during a stop).
    pub fn lost_total(&self) -> u64 {
        match self.event {
            Event::Stop => self.lost,
            _ => self.lost + self.refused,
        }
    }
}

/// Runs one cell.
pub fn run_cell(
    host_bin: &std::path::Path,
    libs: &Libs,
    traffic: Traffic,
    event: Event,
    n: &Counts,
) -> anyhow::Result<Cell> {
    let lib = match traffic {
        Traffic::RawTcp => &libs.echo,
        Traffic::LongStream => &libs.ticker,
        Traffic::WebSocket => &libs.axum,
        _ => &libs.hello,
    };
    let max_requests = if event == Event::Recycles {
        traffic.max_requests(n)
    } else {
        0
    };
    let mut angel = Server::angel(&AngelConfig {
        host_bin,
        lib,
        workers: 2,
        max_requests,
        max_requests_jitter: 0,
    })?;
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let addr = angel.addr;
    let result = std::thread::scope(|s| -> anyhow::Result<Counted> {
        let load = s.spawn(|| load(traffic, addr, n, &stop));
        let driven = drive(&mut angel, event, n);
        stop.store(true, Ordering::Relaxed);
        let counted = load
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        driven?;
        Ok(counted)
    });
    let counted = result?;
    angel.stop()?;
    Ok(Cell {
        traffic,
        event,
        sent: counted.sent,
        lost: counted.lost,
        refused: counted.refused,
        retried: counted.retried,
        secs: started.elapsed().as_secs_f64(),
        samples: counted.samples,
    })
}

/// The libraries the matrix serves.
pub struct Libs {
    pub hello: PathBuf,
    pub echo: PathBuf,
    pub ticker: PathBuf,
    pub axum: PathBuf,
}

/// Drives the event; returns when it is complete (for `stop`: when the master exited).
fn drive(angel: &mut Server, event: Event, n: &Counts) -> anyhow::Result<()> {
    // Let the load reach its steady state first: the schedule, not a synchronisation.
    std::thread::sleep(Duration::from_millis(300));
    match event {
        Event::Rolls => {
            for i in 0..n.rolls {
                let mark = angel.log.len();
                angel.signal(Signal::SIGHUP)?;
                angel
                    .wait_line(mark, |l| {
                        l.contains(" reloaded ") || l.contains("keeping generation")
                    })
                    .with_context(|| format!("roll {i}"))?;
            }
        }
        Event::Recycles => {
            let forked = |a: &Server| {
                a.log
                    .since(0)
                    .iter()
                    .filter(|l| l.text.contains("forked worker["))
                    .count()
            };
            let deadline = Instant::now() + Duration::from_secs(600);
            while forked(angel) < 2 + n.recycles {
                anyhow::ensure!(Instant::now() < deadline, "recycles did not happen");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Event::Resize => {
            for i in 0..n.resizes {
                let mark = angel.log.len();
                angel.signal(Signal::SIGTTIN)?;
                angel
                    .wait_line(mark, |l| {
                        l.contains("listening on") && l.starts_with("worker[")
                    })
                    .with_context(|| format!("TTIN {i}"))?;
                let mark = angel.log.len();
                angel.signal(Signal::SIGTTOU)?;
                angel
                    .wait_line(mark, |l| l.contains(" exited"))
                    .with_context(|| format!("TTOU {i}"))?;
            }
        }
        Event::Stop => {
            angel.signal(Signal::SIGTERM)?;
            angel
                .wait_line(0, |l| l.contains("] stopped"))
                .context("the master did not stop")?;
        }
    }
    // The tail of the load sees the end of the last event.
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

/// Runs the traffic until `stop`.
fn load(
    traffic: Traffic,
    addr: SocketAddr,
    n: &Counts,
    stop: &AtomicBool,
) -> anyhow::Result<Counted> {
    let mode = match traffic {
        Traffic::Http1KeepAlive => Mode::KeepAlive,
        Traffic::Http1Close => Mode::Close,
        Traffic::Http2Busy => {
            return shapes::h2::load(addr, n.h2_connections, n.h2_streams, stop);
        }
        Traffic::Http2Single => return shapes::h2::load(addr, n.connections, 1, stop),
        Traffic::LongStream => return shapes::stream::load(addr, n.connections, stop),
        Traffic::WebSocket => return shapes::ws::load(addr, n.connections, stop),
        Traffic::RawTcp => return shapes::echo::load(addr, n.connections, stop),
    };
    let report = client::run(
        &LoadConfig {
            addr,
            connections: n.connections,
            threads: 1,
            duration: Duration::from_secs(3600),
            mode,
            bucket: Duration::from_secs(1),
            rate: None,
        },
        stop,
    )?;
    let f = report.failures;
    let lost = f.write + f.read + f.timeout + f.status;
    Ok(Counted {
        sent: report.ok + lost + f.connect,
        lost,
        refused: f.connect,
        retried: 0,
        samples: report.samples,
    })
}

/// The markdown table.
pub fn table(cells: &[Cell], n: &Counts) -> String {
    let mut out = String::from(
        "| traffic | event | sent | lost | refused at connect | retried after a goodbye | time |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        out.push_str(&format!(
            "| {} | {} | {} | **{}** | {} | {} | {:.1} s |\n",
            c.traffic.label(n),
            c.event.label(c.traffic, n),
            c.sent,
            c.lost_total(),
            c.refused,
            c.retried,
            c.secs
        ));
    }
    out
}
