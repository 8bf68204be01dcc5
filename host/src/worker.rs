//! Worker mode: the process the master fork+execs (`angel-host: worker`). It loads one
//! generation's snapshot, checks the ABI, and hands the app its listeners, a drain fd and the
//! host callbacks; the app's entry call blocks for the worker's whole life.
//!
//! A thread of the host (not of the app) owns the control channel: it turns the master's
//! `drain` — or EOF, which means the master is gone — into the app's drain fd becoming
//! readable. `SIGTERM` does the same (systemd's `KillMode=control-group` and `docker stop`
//! signal the whole process group: the worker drains instead of dying with requests in
//! flight; the master's kill deadline still bounds it). Since every app kind (HTTP, raw TCP,
//! C) watches that fd, all of them drain on either. The app's callbacks (`ready`, `retiring`,
//! heartbeats, failure reasons) are sent back over the control channel.

use std::ffi::{c_char, c_int, c_void, OsString};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use angel::abi;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{signal, SigHandler, Signal};
use socket2::SockRef;

use crate::control::{self, Msg, Recv};

/// The argv word that selects worker mode (hidden from `--help`).
pub const WORKER_MODE: &str = "__worker";

/// What the master passes to a worker on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The inherited fd of the generation's snapshot (a sealed memfd, or a file the master
    /// holds open); loaded as `/proc/self/fd/N`, never by a path, so neither a temp cleaner
    /// nor a privilege drop can take it away.
    pub snapshot_fd: RawFd,
    /// Probe only: load and check the library, call nothing, exit.
    pub probe: bool,
    pub control_fd: RawFd,
    /// (fd, `abi::LISTENER_*`)
    pub listeners: Vec<(RawFd, u32)>,
    pub slot: u32,
    pub generation: u64,
    pub max_requests: u64,
    pub heartbeat_ms: u64,
    pub graceful_ms: u64,
    /// Log as JSON (`--log-format json` of the master).
    pub log_json: bool,
    /// `--user`/`--group` of the master, resolved: become them before loading the app.
    pub credentials: Option<String>,
}

impl Default for WorkerArgs {
    /// No snapshot and no control fd: not runnable until both are set.
    fn default() -> Self {
        WorkerArgs {
            snapshot_fd: -1,
            probe: false,
            control_fd: -1,
            listeners: Vec::new(),
            slot: 0,
            generation: 0,
            max_requests: 0,
            heartbeat_ms: 0,
            graceful_ms: 0,
            log_json: false,
            credentials: None,
        }
    }
}

fn kv_push(argv: &mut Vec<OsString>, k: &str, v: String) {
    argv.push(k.into());
    argv.push(v.into());
}

impl WorkerArgs {
    /// The argv after the program name.
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec![WORKER_MODE.into()];
        let mut kv = |k: &str, v: String| {
            argv.push(k.into());
            argv.push(v.into());
        };
        kv("--snapshot-fd", self.snapshot_fd.to_string());
        kv("--control-fd", self.control_fd.to_string());
        for (fd, kind) in &self.listeners {
            kv("--listener", format!("{fd}:{kind}"));
        }
        kv("--slot", self.slot.to_string());
        kv("--generation", self.generation.to_string());
        kv("--max-requests", self.max_requests.to_string());
        kv("--heartbeat-ms", self.heartbeat_ms.to_string());
        kv("--graceful-ms", self.graceful_ms.to_string());
        if self.probe {
            argv.push("--probe".into());
        }
        if self.log_json {
            argv.push("--log-json".into());
        }
        if let Some(c) = &self.credentials {
            kv_push(&mut argv, "--credentials", c.clone());
        }
        argv
    }

    /// The fds the child inherits under the same numbers (CLOEXEC cleared only in it).
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|(fd, _)| *fd).collect();
        fds.push(self.control_fd);
        fds.push(self.snapshot_fd);
        fds
    }

    /// Parses what [`WorkerArgs::to_argv`] produced (without the leading mode word).
    pub fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Self, String> {
        let mut out = WorkerArgs::default();
        fn num<T: std::str::FromStr>(k: &str, v: Option<OsString>) -> Result<T, String> {
            v.and_then(|v| v.to_str()?.parse().ok())
                .ok_or_else(|| format!("worker mode: bad value for {k}"))
        }
        while let Some(k) = args.next() {
            let k = k.to_string_lossy().into_owned();
            match k.as_str() {
                "--snapshot-fd" => out.snapshot_fd = num(&k, args.next())?,
                "--probe" => out.probe = true,
                "--log-json" => out.log_json = true,
                "--control-fd" => out.control_fd = num(&k, args.next())?,
                "--listener" => {
                    let v: String = num(&k, args.next())?;
                    let (fd, kind) = v
                        .split_once(':')
                        .and_then(|(f, k)| Some((f.parse().ok()?, k.parse().ok()?)))
                        .ok_or("worker mode: --listener wants fd:kind")?;
                    out.listeners.push((fd, kind));
                }
                "--slot" => out.slot = num(&k, args.next())?,
                "--generation" => out.generation = num(&k, args.next())?,
                "--max-requests" => out.max_requests = num(&k, args.next())?,
                "--heartbeat-ms" => out.heartbeat_ms = num(&k, args.next())?,
                "--graceful-ms" => out.graceful_ms = num(&k, args.next())?,
                "--credentials" => {
                    out.credentials = Some(
                        args.next()
                            .and_then(|v| v.into_string().ok())
                            .ok_or("worker mode: --credentials needs a value")?,
                    )
                }
                other => return Err(format!("worker mode: unknown argument {other}")),
            }
        }
        if out.control_fd < 0 || out.snapshot_fd < 0 {
            return Err("worker mode is internal to angel-host; run `angel-host --help`".into());
        }
        Ok(out)
    }
}

/// Why the library could not be used; each maps to a distinct worker exit code.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The inherited snapshot fd is unusable: the host's fault, not the library's.
    #[error("cannot reach the snapshot through inherited fd {fd} ({path}): {source}")]
    Snapshot {
        fd: RawFd,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load: {0}")]
    Open(String),
    #[error("not an angel app: symbol `{0}` not found (export the app with angel::export! or angel::export_http!)")]
    NotAnApp(&'static str),
    #[error("ABI version mismatch: the library speaks angel ABI {found}, this angel-host speaks ABI {expected}; rebuild the app against a matching angel SDK")]
    AbiMismatch { found: u32, expected: u32 },
}

impl LoadError {
    pub fn exit_code(&self) -> i32 {
        match self {
            LoadError::Snapshot { .. } => abi::EXIT_HOST_ERROR,
            LoadError::Open(_) => abi::EXIT_LOAD_FAILED,
            LoadError::NotAnApp(_) => abi::EXIT_NOT_AN_APP,
            LoadError::AbiMismatch { .. } => abi::EXIT_ABI_MISMATCH,
        }
    }
}

/// Loads the snapshot through its inherited fd (`/proc/self/fd/N`) and returns it with its
/// entry point, then closes the fd (the mapping keeps the copy alive; the app must not
/// inherit it). The library is never unloaded.
///
/// # Safety
/// dlopen runs the library's initialisers (foreign code) in this process; call it only in a
/// worker or probe process, never in the master. `fd` must be the snapshot fd the master
/// passed, owned by nothing else in this process.
unsafe fn load(fd: RawFd) -> Result<(libloading::os::unix::Library, abi::EntryFn), LoadError> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    let path = format!("/proc/self/fd/{fd}");
    let unusable = |source| LoadError::Snapshot {
        fd,
        path: path.clone(),
        source,
    };
    // SAFETY: the caller passes the snapshot fd, which nothing else owns.
    let snapshot = unsafe { OwnedFd::from_raw_fd(fd) };
    // A missing /proc, or an fd that was not inherited, must not read as a broken library.
    nix::sys::stat::fstat(snapshot.as_raw_fd()).map_err(|e| unusable(e.into()))?;
    std::fs::metadata(&path).map_err(unusable)?;
    // SAFETY: the caller accepts running foreign initialisers (see # Safety).
    let opened = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_LOCAL) };
    drop(snapshot);
    let lib = opened.map_err(|e| {
        // dlerror prefixes the fd's path, which means nothing to the user; the master
        // names the user's library instead.
        let text = e.to_string();
        LoadError::Open(text.replace(&format!("{path}: "), ""))
    })?;
    // SAFETY: the symbol is declared by the ABI as `uint32_t angel_abi_version`; we only read
    // the address here.
    let version = unsafe { lib.get::<*const u32>(abi::VERSION_SYMBOL) }
        .map_err(|_| LoadError::NotAnApp("angel_abi_version"))?;
    // SAFETY: dlsym returned the address of a `u32` static that lives as long as the library,
    // which is never unloaded.
    let found = unsafe { **version };
    if found != abi::ABI_VERSION {
        return Err(LoadError::AbiMismatch {
            found,
            expected: abi::ABI_VERSION,
        });
    }
    // SAFETY: with the version matching, the ABI fixes `angel_main`'s type as `EntryFn`.
    let entry = unsafe { lib.get::<abi::EntryFn>(abi::ENTRY_SYMBOL) }
        .map(|sym| *sym)
        .map_err(|_| LoadError::NotAnApp("angel_main"))?;
    Ok((lib, entry))
}

/// State behind `HostApi::data`; lives (leaked) for the whole process.
struct HostState {
    control: OwnedFd,
    listening: String,
    ready: AtomicBool,
    retiring: AtomicBool,
}

/// Runs worker mode; returns the process exit code.
pub fn run(args: WorkerArgs) -> i32 {
    // Terminal signals (Ctrl-C, hang-up, job control) reach the whole process group; they are
    // the master's to act on, and it tells workers what to do over the control channel.
    for sig in [
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this process has set one.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    // SAFETY: the master passed this fd number for our end of the control channel and nothing
    // else in this process owns it.
    let control = unsafe { OwnedFd::from_raw_fd(args.control_fd) };
    // The app may spawn processes of its own: they must not inherit our channel or listeners.
    let mut inherited: Vec<RawFd> = args.listeners.iter().map(|(fd, _)| *fd).collect();
    inherited.push(control.as_raw_fd());
    for fd in inherited {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }

    // App code never runs as root: become `--user` before anything of the app is loaded.
    if let Some(arg) = &args.credentials {
        let dropped = crate::privdrop::Credentials::parse_arg(arg)
            .and_then(|c| crate::privdrop::drop_privileges(&c));
        if let Err(e) = dropped {
            if control::send_msg(control.as_fd(), &Msg::Failed(e.to_string())).is_err() {
                tracing::error!(event = "privileges_failed", "{e}");
            }
            return abi::EXIT_HOST_ERROR;
        }
    }
    // SAFETY: this is a worker (or probe) process: running the app's initialisers is its job;
    // the snapshot fd is the master's, passed to us alone.
    let loaded = unsafe { load(args.snapshot_fd) };
    let (lib, entry) = match loaded {
        Ok(ok) => ok,
        Err(e) => {
            if control::send_msg(control.as_fd(), &Msg::Failed(e.to_string())).is_err() {
                tracing::error!(event = "load_failed", "{e}");
            }
            return e.exit_code();
        }
    };
    if args.probe {
        std::mem::forget(lib);
        return abi::EXIT_OK;
    }

    let (drain_read, drain_write) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(event = "worker_error", "cannot create the drain pipe: {e}");
            return abi::EXIT_HOST_ERROR;
        }
    };
    let drain = Arc::new(DrainPipe {
        write: drain_write,
        fired: AtomicBool::new(false),
        listeners: args.listeners.iter().map(|(fd, _)| *fd).collect(),
        null: nix::fcntl::open(
            "/dev/null",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()
        // SAFETY: `open` just returned this fd; nothing else owns it.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
    });
    // The handler only writes to signal-hook's own self-pipe (async-signal-safe); a thread
    // reads it and starts the drain. Registered before the app runs, so from its first
    // request on a TERM drains it.
    let term = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!(event = "worker_error", "cannot handle SIGTERM: {e}");
            return abi::EXIT_HOST_ERROR;
        }
    };
    let on_term = Arc::clone(&drain);
    if let Err(e) = std::thread::Builder::new()
        .name("angel-sigterm".into())
        .spawn(move || drain_on_term(term, &on_term))
    {
        tracing::error!(
            event = "worker_error",
            "cannot start the signal thread: {e}"
        );
        return abi::EXIT_HOST_ERROR;
    }
    let reader = match control.try_clone() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(
                event = "worker_error",
                "cannot clone the control channel: {e}"
            );
            return abi::EXIT_HOST_ERROR;
        }
    };
    let listening = args
        .listeners
        .iter()
        .map(|&(fd, _)| describe_listener(fd))
        .collect::<Vec<_>>()
        .join(", ");
    let state: &'static HostState = Box::leak(Box::new(HostState {
        control,
        listening,
        ready: AtomicBool::new(false),
        retiring: AtomicBool::new(false),
    }));
    if let Err(e) = std::thread::Builder::new()
        .name("angel-control".into())
        .spawn(move || watch_master(reader, &drain))
    {
        tracing::error!(
            event = "worker_error",
            "cannot start the control thread: {e}"
        );
        return abi::EXIT_HOST_ERROR;
    }

    let listeners: &'static [abi::Listener] = Box::leak(
        args.listeners
            .iter()
            .map(|&(fd, kind)| abi::Listener { fd, kind })
            .collect(),
    );
    let ctx: &'static abi::Context = Box::leak(Box::new(abi::Context {
        size: std::mem::size_of::<abi::Context>() as u32,
        abi_version: abi::ABI_VERSION,
        listeners: listeners.as_ptr(),
        listener_count: listeners.len() as u32,
        drain_fd: drain_read.as_raw_fd(),
        slot: args.slot,
        generation: args.generation,
        max_requests: args.max_requests,
        heartbeat_interval_ms: args.heartbeat_ms,
        graceful_timeout_ms: args.graceful_ms,
        host: abi::HostApi {
            data: state as *const HostState as *mut c_void,
            notify: host_notify,
            log: host_log,
            fail: host_fail,
        },
        log_record: Some(host_log_record),
    }));
    // The drain pipe's read end must outlive the app: it is referenced by the context.
    std::mem::forget(drain_read);
    // SAFETY: `entry` has the ABI's type (checked version); `ctx` and everything it points to
    // is leaked, so valid for the whole call from any thread, as the ABI promises.
    let code = unsafe { entry(ctx) };
    // Never dlclose: Rust cdylibs register TLS destructors that would run on unmapped code.
    std::mem::forget(lib);
    code
}

/// The write end of the app's drain pipe. One byte makes the app's `drain_fd` readable, and
/// as the app never reads it, it stays readable.
struct DrainPipe {
    write: OwnedFd,
    fired: AtomicBool,
    /// Our inherited listener fds, and `/dev/null` to put in their place at the drain.
    listeners: Vec<RawFd>,
    null: Option<OwnedFd>,
}

impl DrainPipe {
    /// Starts the app's drain, once: only the first caller logs (`announce`) and writes.
    fn fire(&self, announce: impl FnOnce()) {
        if self.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        announce();
        while let Err(Errno::EINTR) = nix::unistd::write(&self.write, b"d") {}
        // The app accepts from duplicates of these fds and drops them as it drains; our own
        // references would keep each listening socket open until this process exits, and a
        // socket nobody accepts from any more must close (a graceful stop then refuses new
        // clients at once instead of resetting them later). `/dev/null` takes the fd
        // numbers over, so a late `accept` on them fails instead of meeting a reused number.
        if let Some(null) = &self.null {
            for &fd in &self.listeners {
                let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

/// The control thread: the master's `drain`, or its disappearance, drains the app.
fn watch_master(control: OwnedFd, drain: &DrainPipe) {
    loop {
        match control::recv_msg(&control) {
            Ok(Recv::Msg(Msg::Drain)) => drain.fire(|| tracing::info!(event = "closes", "closes")),
            Ok(Recv::Msg(_)) | Ok(Recv::Empty) => {}
            Ok(Recv::Eof) | Err(_) => {
                drain.fire(|| tracing::warn!(event = "orphaned", "master is gone; draining"));
                return;
            }
        }
    }
}

/// The signal thread: `SIGTERM` drains the app like the master's `drain` (later ones change
/// nothing: only the master decides to kill).
fn drain_on_term(mut signals: signal_hook::iterator::Signals, drain: &DrainPipe) {
    for _ in signals.forever() {
        drain.fire(|| tracing::info!(event = "closes", "closes (SIGTERM)"));
    }
}

fn describe_listener(fd: RawFd) -> String {
    // SAFETY: the fd is one of our inherited listeners, open for the whole process.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match SockRef::from(&borrowed).local_addr() {
        Ok(addr) => match (addr.as_socket(), addr.as_pathname()) {
            (Some(inet), _) => inet.to_string(),
            (None, Some(path)) => format!("unix:{}", path.display()),
            _ => format!("fd {fd}"),
        },
        Err(_) => format!("fd {fd}"),
    }
}

/// # Safety
/// `data` must be the `HostState` this module leaked into the context.
unsafe fn host_state<'a>(data: *mut c_void) -> &'a HostState {
    // SAFETY: guaranteed by the caller; the state is leaked, so 'static in practice.
    unsafe { &*(data as *const HostState) }
}

/// # Safety
/// Called by the app through `HostApi::notify` with the context's `data`.
unsafe extern "C" fn host_notify(data: *mut c_void, event: u32, value: u64) -> c_int {
    // SAFETY: the ABI requires the app to pass back the `data` we gave it.
    let state = unsafe { host_state(data) };
    let sent = std::panic::catch_unwind(|| {
        let msg = match event {
            abi::EVENT_READY => {
                if state.ready.swap(true, Ordering::SeqCst) {
                    return Ok(());
                }
                tracing::info!(event = "ready", "listening on {}", state.listening);
                Msg::Ready
            }
            abi::EVENT_RETIRING => {
                if state.retiring.swap(true, Ordering::SeqCst) {
                    return Ok(());
                }
                Msg::Retiring
            }
            abi::EVENT_HEARTBEAT => Msg::Heartbeat(value),
            _ => return Err(()),
        };
        control::send_msg(state.control.as_fd(), &msg).map_err(|_| ())
    });
    match sent {
        Ok(Ok(())) => 0,
        _ => -1,
    }
}

/// # Safety
/// `msg` must point to `len` readable bytes (the ABI's contract for `HostApi::log`).
unsafe fn text<'a>(msg: *const c_char, len: usize) -> std::borrow::Cow<'a, str> {
    if msg.is_null() || len == 0 {
        return "".into();
    }
    // SAFETY: guaranteed by the caller.
    let bytes = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) };
    String::from_utf8_lossy(bytes)
}

/// # Safety
/// Called by the app through `HostApi::log`: `msg` points to `len` bytes.
unsafe extern "C" fn host_log(_data: *mut c_void, level: u32, msg: *const c_char, len: usize) {
    // SAFETY: the ABI contract of `HostApi::log`.
    let line = unsafe { text(msg, len) };
    let _ = std::panic::catch_unwind(|| match level {
        abi::LOG_ERROR => tracing::error!(event = "app", "{line}"),
        abi::LOG_WARN => tracing::warn!(event = "app", "{line}"),
        // Plain debug lines were never printed (the worker's subscriber used to stop at info);
        // apps that want debug output filter structured records with ANGEL_LOG instead.
        abi::LOG_DEBUG | abi::LOG_TRACE => {}
        _ => tracing::info!(event = "app", "{line}"),
    });
}

/// # Safety
/// Called by the app through `Context::log_record` (ABI 1.1): `record` points to a record
/// whose strings are valid for the call.
unsafe extern "C" fn host_log_record(_data: *mut c_void, record: *const abi::LogRecord) {
    if record.is_null() {
        return;
    }
    // SAFETY: non-null, and the app passes a record valid for the call. Its first field is
    // its size; nothing else is read unless the record is at least as large as ours.
    let size = unsafe { std::ptr::addr_of!((*record).size).read() } as usize;
    if size < std::mem::size_of::<abi::LogRecord>() {
        return;
    }
    // SAFETY: checked size; valid for the call (ABI contract).
    let r = unsafe { &*record };
    // SAFETY: each pointer/length pair is the ABI's contract for the record's strings.
    let (target, message, fields, spans) = unsafe {
        (
            text(r.target, r.target_len),
            text(r.message, r.message_len),
            text(r.fields, r.fields_len),
            text(r.spans, r.spans_len),
        )
    };
    // The app filtered already (ANGEL_LOG): every level it sends is printed. The `app_*`
    // fields are laid out by `crate::log` (seed: `message key=value ...`; json: `target`,
    // `spans`, `fields`).
    macro_rules! app {
        ($level:expr) => {
            tracing::event!(
                $level,
                event = "app",
                app_target = %target,
                app_fields = %fields,
                app_spans = %spans,
                "{message}"
            )
        };
    }
    let _ = std::panic::catch_unwind(|| match r.level {
        abi::LOG_ERROR => app!(tracing::Level::ERROR),
        abi::LOG_WARN => app!(tracing::Level::WARN),
        abi::LOG_DEBUG => app!(tracing::Level::DEBUG),
        abi::LOG_TRACE => app!(tracing::Level::TRACE),
        _ => app!(tracing::Level::INFO),
    });
}

/// # Safety
/// Called by the app through `HostApi::fail` with the context's `data`; `msg` points to `len`
/// bytes.
unsafe extern "C" fn host_fail(data: *mut c_void, msg: *const c_char, len: usize) {
    // SAFETY: the ABI contract of `HostApi::fail`.
    let (state, why) = unsafe { (host_state(data), text(msg, len)) };
    let _ = std::panic::catch_unwind(|| {
        if control::send_msg(state.control.as_fd(), &Msg::Failed(why.to_string())).is_err() {
            tracing::error!(event = "app_failed", "{why}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_args_round_trip() {
        let args = WorkerArgs {
            snapshot_fd: 4,
            probe: false,
            control_fd: 7,
            listeners: vec![(5, abi::LISTENER_TCP), (6, abi::LISTENER_UNIX)],
            slot: 2,
            generation: 3,
            max_requests: 1000,
            heartbeat_ms: 1000,
            graceful_ms: 30_000,
            log_json: true,
            credentials: Some("65534:65534:65534:nobody".into()),
        };
        let argv = args.to_argv();
        assert_eq!(argv[0], WORKER_MODE);
        assert_eq!(WorkerArgs::parse(argv.into_iter().skip(1)), Ok(args));
        assert!(WorkerArgs::parse(std::iter::empty()).is_err());
    }
}
