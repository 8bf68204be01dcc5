//! `app-plain`: the template's router as an ordinary server binary, with no angel-host.
//!
//! Only for `bench/scripts/side-by-side.py`, which compares `angel-host --watch` on the cdylib
//! with the usual restart-the-binary dev loops (`watchexec -r`, with and without `systemfd`)
//! on the same handler. Not part of a generated project (`cargo-generate.toml` leaves it out).
//!
//! Serves on the listening socket handed over in `LISTEN_FDS` (systemfd, systemd) if there is
//! one, else binds the address given as its only argument (default `127.0.0.1:3000`). On
//! `SIGTERM` or `SIGINT` (what `watchexec -r` sends) it stops accepting and finishes the
//! requests in flight, as a well-behaved server does.
//!
//!     cargo build --release -p app --features plain-bin --bin app-plain

#[path = "../src/lib.rs"]
#[allow(dead_code)] // `make_router` is angel's entry: unused when no host calls it.
mod app;

use std::error::Error;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};

/// The first fd of the `LISTEN_FDS` protocol (sd_listen_fds(3)).
const LISTEN_FDS_START: i32 = 3;
/// Where it binds when nothing is handed over.
const DEFAULT_ADDR: &str = "127.0.0.1:3000";
/// Runtime threads: as many as angel-host's default workers on the bench machine (2 cores).
const THREADS: usize = 2;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                eprintln!("caused by: {c}");
                cause = c.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let listener = match inherited()? {
        Some(listener) => listener,
        None => {
            let addr = std::env::args().nth(1);
            TcpListener::bind(addr.as_deref().unwrap_or(DEFAULT_ADDR))?
        }
    };
    listener.set_nonblocking(true)?;
    eprintln!(
        "app-plain[{}] listening on {}",
        std::process::id(),
        listener.local_addr()?
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        axum::serve(listener, app::router())
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            })
            .await?;
        Ok(())
    })
}

/// The socket in `LISTEN_FDS`, if one was handed over: fd 3, checked to be a TCP socket.
fn inherited() -> Result<Option<TcpListener>, Box<dyn Error>> {
    let Ok(count) = std::env::var("LISTEN_FDS") else {
        return Ok(None);
    };
    // systemd names the receiving process; `systemfd --no-pid` does not (watchexec forks).
    if let Ok(pid) = std::env::var("LISTEN_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(None);
        }
    }
    if count.parse::<u32>().unwrap_or(0) < 1 {
        return Err(format!("LISTEN_FDS={count:?}: no socket handed over").into());
    }
    // Children (none here) must not take the socket for theirs.
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_PID");
    // SAFETY: under the LISTEN_FDS protocol fd 3 was opened by our parent for us and nothing
    // else in this process owns it; it is taken exactly once, here.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let listener = TcpListener::from(fd);
    listener
        .local_addr()
        .map_err(|e| format!("LISTEN_FDS: fd {LISTEN_FDS_START} is not a TCP socket: {e}"))?;
    Ok(Some(listener))
}
