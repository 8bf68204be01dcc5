//! `plain-hyper`: the reference servers the benchmark compares angel-host against.
//!
//! The same shape as an angel-host worker running `examples/hello`, minus angel-host: N
//! processes, each with its own `SO_REUSEPORT` socket on one shared port, each serving on a
//! current-thread tokio runtime, `TCP_NODELAY` on accepted sockets, and `examples/hello`'s
//! handler (`GET /` answers `Hello:<pid>`; `src/hello_handler.rs`). No drain, no request counting, no control channel. Two protocol stacks:
//!
//! - default (`plain-hyper` in the reports): hyper-util's `auto::Builder` (HTTP/1 and HTTP/2
//!   detection on every connection, `Rewind`, upgrades);
//! - `--http1` (`minimal-http1`): hyper's own `http1::Builder`, the least a hyper server can
//!   do, and the floor the angel SDK is held to.
//!
//! The parent binds the sockets, forks the serving children before it has any thread (so the
//! children may do anything after the fork), prints `plain[<pid>] listening on <addr>`, then
//! waits; each child prints `plain[<pid>] ready` once its accept loop runs. A child dies with its
//! parent (`PR_SET_PDEATHSIG`): this is a benchmark fixture, not a server to drain gracefully.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};
use socket2::{Domain, Protocol, Socket, Type};

#[path = "../hello_handler.rs"]
mod hello_handler;
use hello_handler::hello;

/// Listen backlog of every socket, as large as the kernel allows (angel-host asks for the same).
const BACKLOG: i32 = 1024;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    addr: SocketAddr,
    processes: usize,
    /// `hyper::server::conn::http1` instead of hyper-util's auto builder.
    http1: bool,
    /// Start one idle thread in each serving child: the control experiment for what being a
    /// multi-threaded process costs (bench/scripts/cpu-pinned.sh).
    idle_thread: bool,
    /// Keep one tokio timer pending in each serving child (a task that wakes once a second):
    /// the control experiment for what a pending timer costs (`epoll_wait` then always has a
    /// timeout, which the kernel serves with a high-resolution timer every time it blocks).
    idle_timer: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut addr: SocketAddr = "127.0.0.1:0".parse()?;
    let mut processes = 1;
    let mut http1 = false;
    let mut idle_thread = false;
    let mut idle_timer = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--http1" {
            http1 = true;
            continue;
        }
        if arg == "--idle-thread" {
            idle_thread = true;
            continue;
        }
        if arg == "--idle-timer" {
            idle_timer = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--addr" => addr = value.parse().context("--addr")?,
            "--processes" => processes = value.parse().context("--processes")?,
            _ => bail!(
                "usage: plain-hyper [--addr 127.0.0.1:0] [--processes N] [--http1] [--idle-thread] [--idle-timer]"
            ),
        }
    }
    if processes == 0 {
        bail!("--processes must be at least 1");
    }
    Ok(Args {
        addr,
        processes,
        http1,
        idle_thread,
        idle_timer,
    })
}

fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    let first = bind(args.addr)?;
    let addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..args.processes {
        sockets.push(bind(addr)?);
    }
    eprintln!("plain[{}] listening on {addr}", std::process::id());
    let mut children = Vec::new();
    for i in 0..sockets.len() {
        // SAFETY: this process has a single thread here (no runtime was built yet), so the child
        // may run arbitrary code after the fork.
        match unsafe { fork() }.context("fork")? {
            ForkResult::Child => {
                // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number has no memory
                // effects.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                let listener = sockets.swap_remove(i);
                drop(sockets);
                return serve(listener, &args);
            }
            ForkResult::Parent { child } => children.push(child),
        }
    }
    drop(sockets);
    for child in children {
        // A child only ends when killed; the parent ends with the last one.
        let _ = waitpid(child, None);
    }
    Ok(())
}

/// One `SO_REUSEPORT` listening socket on `addr`.
fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A serving child: current-thread runtime, accept loop, one task per connection.
fn serve(listener: TcpListener, args: &Args) -> anyhow::Result<()> {
    if args.idle_thread {
        std::thread::Builder::new()
            .name("idle".into())
            .spawn(|| loop {
                std::thread::park();
            })?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if args.idle_timer {
        runtime.spawn(async {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
    if args.http1 {
        runtime.block_on(accept_loop_http1(listener))
    } else {
        runtime.block_on(accept_loop(listener))
    }
}

/// The minimal server: hyper's `http1` connection on the accepted socket, nothing around it.
async fn accept_loop_http1(listener: TcpListener) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let builder = hyper::server::conn::http1::Builder::new();
    let message = hello_handler::message();
    eprintln!("plain[{}] ready", std::process::id());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn({
                let message = Arc::clone(&message);
                move |req| hello(req, Arc::clone(&message))
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn accept_loop(listener: TcpListener) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let builder = auto::Builder::new(TokioExecutor::new());
    let message = hello_handler::message();
    eprintln!("plain[{}] ready", std::process::id());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Best effort, as in the angel SDK.
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn({
                    let message = Arc::clone(&message);
                    move |req| hello(req, Arc::clone(&message))
                }),
            )
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
