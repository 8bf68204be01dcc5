//! The loss matrix: traffic shapes × operator events, every request counted.
//!
//! Each cell starts a fresh angel-host (release build, 2 workers), runs one traffic shape flat
//! out on it, drives one kind of event N times, and counts:
//! - **sent**: requests (or echo messages) written;
//! - **lost**: sent and not answered — any read/write error, timeout, bad status or wrong
//!   echo after the request was written, nothing retried;
//! - **refused**: connects that failed. During rolls, recycles and resizes a refused connect is
//!   lost too (nothing should be refused while the server runs); during a graceful stop it is
//!   the expected answer to a request that arrives after the stop began.
//!
//! Events: `rolls` (HUP, wait for `reloaded`, N times), `recycles` (`--max-requests M`, until
//! N workers were forked as replacements), `resize` (TTIN then TTOU, each waited for, N pairs),
//! `stop` (TERM under load; the load continues until the master exited).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::client::{self, LoadConfig, Mode};
use crate::server::{AngelConfig, Server};

/// One traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    Http1KeepAlive,
    Http1Close,
    RawTcp,
}

impl Traffic {
    pub const ALL: [Traffic; 3] = [
        Traffic::Http1KeepAlive,
        Traffic::Http1Close,
        Traffic::RawTcp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Traffic::Http1KeepAlive => "HTTP/1 keep-alive, flat out",
            Traffic::Http1Close => "HTTP/1 Connection: close",
            Traffic::RawTcp => "raw TCP echo (examples/echo)",
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

    pub fn label(self, n: &Counts) -> String {
        match self {
            Event::Rolls => format!("{} rolls", n.rolls),
            Event::Recycles => format!(
                "{} recycles (--max-requests {})",
                n.recycles, n.max_requests
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
}

/// What one cell saw.
#[derive(Debug, Clone)]
pub struct Cell {
    pub traffic: Traffic,
    pub event: Event,
    pub sent: u64,
    pub lost: u64,
    pub refused: u64,
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
        _ => &libs.hello,
    };
    let max_requests = if event == Event::Recycles {
        n.max_requests
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
    let result = std::thread::scope(|s| -> anyhow::Result<(u64, u64, u64, Vec<String>)> {
        let load = s.spawn(|| load(traffic, addr, n.connections, &stop));
        let driven = drive(&mut angel, event, n);
        stop.store(true, Ordering::Relaxed);
        let counted = load
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        driven?;
        Ok(counted)
    });
    let (sent, lost, refused, samples) = result?;
    angel.stop()?;
    Ok(Cell {
        traffic,
        event,
        sent,
        lost,
        refused,
        secs: started.elapsed().as_secs_f64(),
        samples,
    })
}

/// The libraries the matrix serves.
pub struct Libs {
    pub hello: PathBuf,
    pub echo: PathBuf,
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

/// Runs the traffic until `stop`; returns (sent, lost, refused, samples).
fn load(
    traffic: Traffic,
    addr: SocketAddr,
    connections: usize,
    stop: &AtomicBool,
) -> anyhow::Result<(u64, u64, u64, Vec<String>)> {
    let mode = match traffic {
        Traffic::Http1KeepAlive => Mode::KeepAlive,
        Traffic::Http1Close => Mode::Close,
        Traffic::RawTcp => return echo_load(addr, connections, stop),
    };
    let report = client::run(
        &LoadConfig {
            addr,
            connections,
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
    Ok((
        report.ok + lost + f.connect,
        lost,
        f.connect,
        report.samples,
    ))
}

/// Messages per echo connection: raw TCP apps count connections for `--max-requests`, so
/// sessions must end for recycles to happen.
const ECHO_SESSION: usize = 20;

/// Echo clients: each connection sends a numbered line, waits for it back, [`ECHO_SESSION`]
/// times, then closes and reconnects; a connection the server closed (drain) is replaced.
fn echo_load(
    addr: SocketAddr,
    connections: usize,
    stop: &AtomicBool,
) -> anyhow::Result<(u64, u64, u64, Vec<String>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sent = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let flag = Arc::new(AtomicBool::new(false));
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..connections {
            let (sent, lost, refused, samples, flag) = (
                Arc::clone(&sent),
                Arc::clone(&lost),
                Arc::clone(&refused),
                Arc::clone(&samples),
                Arc::clone(&flag),
            );
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    let stream = match tokio::net::TcpStream::connect(addr).await {
                        Ok(s) => s,
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            sent.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                    };
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    let mut done = 0;
                    while !flag.load(Ordering::Relaxed) {
                        if done == ECHO_SESSION {
                            // A clean end of the session: our FIN, then theirs.
                            let _ = stream.get_mut().shutdown().await;
                            let mut rest = Vec::new();
                            let _ = tokio::time::timeout(
                                client::REQUEST_TIMEOUT,
                                tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
                            )
                            .await;
                            break;
                        }
                        done += 1;
                        seq += 1;
                        let msg = format!("c{c} m{seq}\n");
                        sent.fetch_add(1, Ordering::Relaxed);
                        line.clear();
                        let answered = async {
                            stream.get_mut().write_all(msg.as_bytes()).await?;
                            stream.read_line(&mut line).await
                        };
                        match tokio::time::timeout(client::REQUEST_TIMEOUT, answered).await {
                            Ok(Ok(_)) if line == msg => {}
                            // EOF before any answer right after our write: the server's drain
                            // closed the connection; the message is lost all the same.
                            other => {
                                lost.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut s) = samples.lock() {
                                    if s.len() < 5 {
                                        s.push(format!("echo: {other:?} line {line:?}"));
                                    }
                                }
                                break;
                            }
                        }
                    }
                }
            }));
        }
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        flag.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    });
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((
        sent.load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        samples,
    ))
}

/// The markdown table.
pub fn table(cells: &[Cell], n: &Counts) -> String {
    let mut out = String::from("| traffic | event | sent | lost | refused at connect | time |\n|---|---|---:|---:|---:|---:|\n");
    for c in cells {
        out.push_str(&format!(
            "| {} | {} | {} | **{}** | {} | {:.1} s |\n",
            c.traffic.label(),
            c.event.label(n),
            c.sent,
            c.lost_total(),
            c.refused,
            c.secs
        ));
    }
    out
}
