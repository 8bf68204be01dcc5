//! The master's control socket and the `reload` / `stop` / `status` commands that use it.
//!
//! The socket lives in a private directory — `$XDG_RUNTIME_DIR/angel-host-<uid>/` (or the
//! temp dir), mode 0700, checked to be ours on both ends — and is named for the master's pid,
//! so a command finds it through the pidfile alone. One request line per connection:
//! `status`, `reload`, `stop`, `stop-fast`. `status` answers one JSON line; `reload` answers
//! once the roll it asked for ended (`{"ok":true,...}` or the reason it failed); `stop` answers
//! at once and then holds the connection until the master exits, so the command can wait.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pidfile::{self, Existing};

/// The private directory holding every control socket of this user.
pub fn socket_dir() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("angel-host-{}", nix::unistd::getuid()))
}

/// The control socket of the master with `pid`.
pub fn socket_path(pid: i32) -> PathBuf {
    socket_dir().join(format!("master-{pid}.sock"))
}

/// Refuses a directory that another user could write to (or that is not ours).
fn check_private(dir: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(dir)?;
    if meta.uid() != nix::unistd::getuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not private (must be owned by us with mode 0700)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Status,
    Reload,
    Stop,
    StopFast,
    Upgrade,
}

impl Request {
    fn word(self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Reload => "reload",
            Request::Stop => "stop",
            Request::StopFast => "stop-fast",
            Request::Upgrade => "upgrade",
        }
    }

    pub fn parse(line: &str) -> Option<Self> {
        Some(match line.trim() {
            "status" => Request::Status,
            "reload" => Request::Reload,
            "stop" => Request::Stop,
            "stop-fast" => Request::StopFast,
            "upgrade" => Request::Upgrade,
            _ => return None,
        })
    }
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: i32,
    pub uptime_secs: f64,
    /// The serving generation (0 before the first one is ready).
    pub generation: u64,
    /// The library as given and as resolved for the serving generation. Paths need not be
    /// UTF-8 and JSON strings must be: they are sent lossily (U+FFFD for bytes that are not).
    #[serde(with = "lossy_path")]
    pub lib: PathBuf,
    #[serde(with = "lossy_path::option")]
    pub library: Option<PathBuf>,
    pub sha256: Option<String>,
    pub listening: Vec<String>,
    /// A new generation is starting (not serving yet).
    pub rolling: bool,
    /// A new generation serves, and the previous one still serves beside it for the settle
    /// period before it drains.
    #[serde(default)]
    pub settling: bool,
    pub stopping: bool,
    pub configured_workers: usize,
    pub workers: Vec<WorkerStatus>,
    /// The angel-host binary this master was started from (what `upgrade` runs).
    #[serde(default, with = "lossy_path::option")]
    pub binary: Option<PathBuf>,
    /// When this master started, in seconds since the Unix epoch.
    #[serde(default)]
    pub started_unix: Option<u64>,
    /// The processes that are not workers: each live generation's zygote, the spare probe.
    #[serde(default)]
    pub helpers: Vec<HelperStatus>,
}

/// A zygote (`generation` set) or the spare probe (`generation` none) in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelperStatus {
    pub pid: i32,
    /// `zygote` or `spare`.
    pub role: String,
    pub generation: Option<u64>,
}

/// Paths as JSON strings, whatever their bytes (serde's own impl fails on non-UTF-8, and a
/// `status` that cannot be serialized is never answered).
mod lossy_path {
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&path.to_string_lossy())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        String::deserialize(d).map(PathBuf::from)
    }

    pub mod option {
        use std::path::PathBuf;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
            match path {
                Some(p) => s.serialize_some(&p.to_string_lossy()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
            Option::<String>::deserialize(d).map(|o| o.map(PathBuf::from))
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: i32,
    pub slot: usize,
    pub generation: u64,
    pub state: String,
    pub age_secs: f64,
    pub requests: u64,
}

/// The answer to `reload`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadOutcome {
    pub ok: bool,
    pub generation: u64,
    pub message: String,
}

/// The master's end.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    pub fn bind(pid: i32) -> io::Result<Self> {
        let dir = socket_dir();
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        check_private(&dir)?;
        crate::snapshot::sweep_dead(&dir, "master-", ".");
        let path = socket_path(pid);
        // A socket of a dead master with a recycled pid: nobody can be listening on it.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Server { listener, path })
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts one pending client, non-blocking: the master reads its request line as it
    /// arrives, never waiting for it.
    pub fn accept(&self) -> Option<UnixStream> {
        let (stream, _) = self.listener.accept().ok()?;
        stream.set_nonblocking(true).ok()?;
        Some(stream)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes one JSON line; a client that went away is not an error worth logging.
pub fn reply<T: Serialize>(mut stream: &UnixStream, value: &T) {
    if let Ok(mut line) = serde_json::to_string(value) {
        line.push('\n');
        let _ = stream.write_all(line.as_bytes());
    }
}

/// Why a command could not reach a master. Exit codes follow the LSB init-script
/// conventions for `status`: 1 = a pidfile names a dead master, 3 = not running.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("not running: no pidfile at {}", path.display())]
    NotRunning { path: PathBuf },
    #[error("stale pidfile {}: {what}; no angel-host master is running", path.display())]
    Stale { path: PathBuf, what: String },
    #[error("cannot talk to master {pid} at {}: {source}", path.display())]
    Connect {
        pid: i32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("master {pid}: {message}")]
    Failed { pid: i32, message: String },
    #[error("master {pid} did not answer: {source}")]
    Io { pid: i32, source: io::Error },
    #[error(transparent)]
    Pidfile(#[from] pidfile::PidfileError),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Stale { .. } => 1,
            CtlError::NotRunning { .. } => 3,
            CtlError::Connect { .. } | CtlError::Io { .. } | CtlError::Pidfile(_) => 4,
            CtlError::Failed { .. } => 5,
        }
    }
}

/// A connected client: the master's pid and the stream.
pub struct Client {
    pub pid: i32,
    stream: UnixStream,
}

impl Client {
    /// Finds the master through `pidfile` and connects to its control socket.
    pub fn connect(pidfile: &Path) -> Result<Self, CtlError> {
        let path = std::path::absolute(pidfile).unwrap_or_else(|_| pidfile.to_path_buf());
        let pid = match pidfile::inspect(&path)? {
            Existing::None => return Err(CtlError::NotRunning { path }),
            Existing::Stale(None) => {
                return Err(CtlError::Stale {
                    path,
                    what: "it holds no pid".into(),
                })
            }
            Existing::Stale(Some(pid)) => {
                return Err(CtlError::Stale {
                    path,
                    what: format!("pid {pid} is not an angel-host master"),
                })
            }
            Existing::Live(pid) => pid,
        };
        let sock = socket_path(pid);
        let connect = || -> io::Result<UnixStream> {
            check_private(&socket_dir())?;
            UnixStream::connect(&sock)
        };
        let stream = connect().map_err(|source| CtlError::Connect {
            pid,
            path: sock.clone(),
            source,
        })?;
        Ok(Client { pid, stream })
    }

    /// Sends `request` and returns the first answer line.
    pub fn call(
        &mut self,
        request: Request,
        timeout: Option<Duration>,
    ) -> Result<String, CtlError> {
        let pid = self.pid;
        let io = |source| CtlError::Io { pid, source };
        self.stream.set_read_timeout(timeout).map_err(io)?;
        writeln!(self.stream, "{}", request.word()).map_err(io)?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .read_line(&mut line)
            .map_err(io)?;
        if line.is_empty() {
            return Err(io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed without an answer",
            )));
        }
        Ok(line)
    }

    /// After `stop`: blocks until the master closes the connection, i.e. has exited.
    pub fn wait_closed(&mut self, timeout: Option<Duration>) -> Result<(), CtlError> {
        let pid = self.pid;
        self.stream
            .set_read_timeout(timeout)
            .map_err(|source| CtlError::Io { pid, source })?;
        let mut rest = Vec::new();
        io::Read::read_to_end(&mut self.stream, &mut rest)
            .map(|_| ())
            .map_err(|source| CtlError::Io { pid, source })
    }
}

/// Human-readable `status`.
pub fn format_status(s: &Status) -> String {
    let mut out = String::new();
    let lib = s.library.as_deref().unwrap_or(&s.lib);
    out.push_str(&format!(
        "master {}: up {}, generation {}{}{}\n",
        s.pid,
        human_secs(s.uptime_secs),
        s.generation,
        if s.rolling {
            ", rolling"
        } else if s.settling {
            ", settling"
        } else {
            ""
        },
        if s.stopping { ", stopping" } else { "" },
    ));
    if let Some(binary) = &s.binary {
        let started = s
            .started_unix
            .map_or_else(String::new, |t| format!(", started {}", utc(t)));
        out.push_str(&format!("binary {}{started}\n", binary.display()));
    }
    out.push_str(&format!(
        "library {} (sha {})\n",
        lib.display(),
        match s.sha256.as_deref() {
            Some(h) => &h[..h.len().min(16)],
            // A roll serves as soon as its workers are ready; its hash follows within ms.
            None if s.generation > 0 => "pending",
            None => "-",
        }
    ));
    out.push_str(&format!("listening on {}\n", s.listening.join(", ")));
    out.push_str(&format!(
        "{:>8} {:>4} {:>4} {:>9} {:>8} {:>9}\n",
        "PID", "SLOT", "GEN", "STATE", "AGE", "REQUESTS"
    ));
    for w in &s.workers {
        out.push_str(&format!(
            "{:>8} {:>4} {:>4} {:>9} {:>8} {:>9}\n",
            w.pid,
            w.slot,
            w.generation,
            w.state,
            human_secs(w.age_secs),
            w.requests
        ));
    }
    for h in &s.helpers {
        match h.generation {
            Some(g) => out.push_str(&format!("{} {} (generation {g})\n", h.role, h.pid)),
            None => out.push_str(&format!("{} {}\n", h.role, h.pid)),
        }
    }
    out
}

/// `2026-12-01 12:00:00 UTC` from seconds since the epoch (the log's own date arithmetic).
fn utc(secs: u64) -> String {
    let stamp = crate::log::rfc3339(i64::try_from(secs).unwrap_or(i64::MAX), 0);
    format!("{} {} UTC", &stamp[..10], &stamp[11..19])
}

fn human_secs(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{secs:.1}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
#[path = "ctl_tests.rs"]
mod tests;
