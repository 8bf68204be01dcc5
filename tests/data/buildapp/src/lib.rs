//! Test fixture: an angel ABI v1 app written by hand against the C layout of `angel::abi`
//! (`sdk/include/angel.h`), with std only, so a test can build it from scratch in seconds.
//!
//! A blocking HTTP/1 server: it `poll(2)`s its listeners and the drain fd, accepts at most one
//! connection per listener per wake-up, serves each connection completely (one request, answered
//! with `Connection: close` and the body `<BUILD>:<pid>`), and returns 0 as soon as the drain fd
//! is readable. Connections still queued in the kernel then belong to the slot's socket, which
//! the master keeps open, so the next generation's worker of the slot accepts them: nothing is
//! lost. The tests rewrite the [`BUILD`] line to produce a different library.

use std::ffi::{c_char, c_int, c_short, c_ulong, c_void};
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

/// The build marker every response body starts with. Tests replace this exact line.
const BUILD: &str = "build-1";

/// How long one client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

const ABI_VERSION: u32 = 1;
const LISTENER_UNIX: u32 = 2;
const EVENT_READY: u32 = 1;
const EVENT_RETIRING: u32 = 2;
const EVENT_HEARTBEAT: u32 = 3;
const EXIT_OK: i32 = 0;
const EXIT_APP_ERROR: i32 = 1;
const EXIT_APP_PANIC: i32 = 70;
const EXIT_ABI_MISMATCH: i32 = 76;
const POLLIN: c_short = 0x1;

#[repr(C)]
struct Listener {
    fd: c_int,
    kind: u32,
}

#[repr(C)]
struct HostApi {
    data: *mut c_void,
    notify: unsafe extern "C" fn(data: *mut c_void, event: u32, value: u64) -> c_int,
    log: unsafe extern "C" fn(data: *mut c_void, level: u32, msg: *const c_char, len: usize),
    fail: unsafe extern "C" fn(data: *mut c_void, msg: *const c_char, len: usize),
}

/// `angel_context`, field for field.
#[repr(C)]
pub struct Context {
    size: u32,
    abi_version: u32,
    listeners: *const Listener,
    listener_count: u32,
    drain_fd: c_int,
    slot: u32,
    generation: u64,
    max_requests: u64,
    heartbeat_interval_ms: u64,
    graceful_timeout_ms: u64,
    host: HostApi,
}

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: c_short,
    revents: c_short,
}

extern "C" {
    fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
}

/// The ABI version symbol the worker reads before calling anything.
#[export_name = "angel_abi_version"]
pub static ANGEL_ABI_VERSION: u32 = ABI_VERSION;

/// The entry point: serves until drained.
///
/// # Safety
/// `ctx` must be a valid `angel_context` for the whole call (the host's promise).
#[no_mangle]
pub unsafe extern "C" fn angel_main(ctx: *const Context) -> i32 {
    // SAFETY: the host passes a context valid for the whole call.
    let ctx = unsafe { &*ctx };
    // A panic must not unwind into the host.
    std::panic::catch_unwind(|| run(ctx)).unwrap_or(EXIT_APP_PANIC)
}

enum Accept {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Accept {
    fn fd(&self) -> c_int {
        match self {
            Accept::Tcp(l) => l.as_raw_fd(),
            Accept::Unix(l) => l.as_raw_fd(),
        }
    }

    /// Accepts one connection and serves it completely; `Ok(false)` if none was queued.
    fn serve_one(&self, body: &[u8]) -> io::Result<bool> {
        let result = match self {
            Accept::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                serve(s, body)
            }),
            Accept::Unix(l) => l.accept().map(|(s, _)| serve(s, body)),
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // Another worker of the slot took it, a signal, or a client that already left.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Reads one request head and answers it; a client that misbehaves only loses its own answer.
fn serve<S: Read + Write + TimeoutStream>(mut s: S, body: &[u8]) {
    let _ = s.timeouts(IO_TIMEOUT);
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    resp.extend_from_slice(body);
    let _ = s.write_all(&resp);
    let _ = s.flush();
}

trait TimeoutStream {
    fn timeouts(&self, t: Duration) -> io::Result<()>;
}

impl TimeoutStream for std::net::TcpStream {
    fn timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl TimeoutStream for std::os::unix::net::UnixStream {
    fn timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

fn fail(ctx: &Context, why: &str, code: i32) -> i32 {
    // SAFETY: the host's callback, with its own data and `why.len()` readable bytes.
    unsafe { (ctx.host.fail)(ctx.host.data, why.as_ptr().cast(), why.len()) };
    code
}

fn run(ctx: &Context) -> i32 {
    if (ctx.size as usize) < std::mem::size_of::<Context>() || ctx.abi_version != ABI_VERSION {
        return fail(ctx, "buildapp: host speaks another ABI", EXIT_ABI_MISMATCH);
    }
    let raw: &[Listener] = if ctx.listener_count == 0 {
        &[]
    } else {
        // SAFETY: the host promises `listener_count` entries, valid for the whole call.
        unsafe { std::slice::from_raw_parts(ctx.listeners, ctx.listener_count as usize) }
    };
    let mut listeners = Vec::new();
    for l in raw {
        // SAFETY: the fd is the host's open listener for the whole call; we only dup it.
        let dup: io::Result<OwnedFd> = unsafe { BorrowedFd::borrow_raw(l.fd) }.try_clone_to_owned();
        let accept = match dup {
            Ok(fd) if l.kind == LISTENER_UNIX => Accept::Unix(UnixListener::from(fd)),
            Ok(fd) => Accept::Tcp(TcpListener::from(fd)),
            Err(e) => return fail(ctx, &format!("buildapp: dup listener: {e}"), EXIT_APP_ERROR),
        };
        // Shared with the other workers of the slot: a wake-up may find the queue empty.
        let nonblocking = match &accept {
            Accept::Tcp(l) => l.set_nonblocking(true),
            Accept::Unix(l) => l.set_nonblocking(true),
        };
        if let Err(e) = nonblocking {
            return fail(ctx, &format!("buildapp: nonblocking: {e}"), EXIT_APP_ERROR);
        }
        listeners.push(accept);
    }
    let body = format!("{BUILD}:{}\n", std::process::id()).into_bytes();
    let notify = |event: u32, value: u64| {
        // SAFETY: the host's callback, with its own data.
        unsafe { (ctx.host.notify)(ctx.host.data, event, value) }
    };
    notify(EVENT_READY, 0);

    let beat = Duration::from_millis(ctx.heartbeat_interval_ms);
    let mut next_beat = Instant::now() + beat;
    let mut served: u64 = 0;
    loop {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd {
                fd: l.fd(),
                events: POLLIN,
                revents: 0,
            })
            .collect();
        fds.push(PollFd {
            fd: ctx.drain_fd,
            events: POLLIN,
            revents: 0,
        });
        let timeout = if beat.is_zero() {
            -1
        } else {
            next_beat
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(60_000) as c_int
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { poll(fds.as_mut_ptr(), fds.len() as c_ulong, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return fail(ctx, &format!("buildapp: poll: {e}"), EXIT_APP_ERROR);
        }
        // The drain fd (readable, or hung up): stop accepting; every accepted connection was
        // already served in full.
        if fds.last().is_some_and(|d| d.revents != 0) {
            return EXIT_OK;
        }
        for (l, p) in listeners.iter().zip(&fds) {
            if p.revents == 0 {
                continue;
            }
            match l.serve_one(&body) {
                Ok(true) => served += 1,
                Ok(false) => {}
                Err(e) => return fail(ctx, &format!("buildapp: accept: {e}"), EXIT_APP_ERROR),
            }
        }
        if ctx.max_requests > 0 && served >= ctx.max_requests {
            notify(EVENT_RETIRING, served);
            return EXIT_OK;
        }
        if !beat.is_zero() && Instant::now() >= next_beat {
            notify(EVENT_HEARTBEAT, served);
            next_beat = Instant::now() + beat;
        }
    }
}
