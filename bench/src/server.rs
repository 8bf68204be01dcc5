//! The servers under test as child processes: angel-host (master + workers) and the
//! `plain-hyper` reference, with their stderr read continuously and timestamped on arrival.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a server may take to start serving (debug builds on a busy machine are slow).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a server may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One stderr line, stamped when the reader thread got it.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub at: Instant,
    pub text: String,
}

/// The stderr of a child, line by line, as it arrives.
#[derive(Debug, Default)]
pub struct Log {
    lines: Mutex<Vec<LogLine>>,
    grew: Condvar,
}

impl Log {
    fn push(&self, text: String) {
        let line = LogLine {
            at: Instant::now(),
            text,
        };
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
        self.grew.notify_all();
    }

    /// Number of lines so far.
    pub fn len(&self) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no line arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies of the lines from index `from` on.
    pub fn since(&self, from: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Waits until a line at index ≥ `from` satisfies `pred`; returns its index and the line.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, LogLine)> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = from;
        loop {
            while next < lines.len() {
                if pred(&lines[next].text) {
                    return Some((next, lines[next].clone()));
                }
                next += 1;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            lines = self
                .grew
                .wait_timeout(lines, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let start = lines.len().saturating_sub(n);
        lines[start..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A running server process and its log.
pub struct Server {
    pub name: &'static str,
    child: Child,
    pub log: Arc<Log>,
    pub addr: SocketAddr,
    reader: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

/// How to start angel-host.
pub struct AngelConfig<'a> {
    pub host_bin: &'a Path,
    pub lib: &'a Path,
    pub workers: usize,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
}

impl Server {
    /// Starts angel-host on an ephemeral port and waits for generation 1 to serve.
    pub fn angel(cfg: &AngelConfig<'_>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("angel-bench").tempdir()?;
        let mut cmd = Command::new(cfg.host_bin);
        cmd.arg("--lib")
            .arg(cfg.lib)
            .args(["--host", "127.0.0.1", "--port", "0", "--workers"])
            .arg(cfg.workers.to_string())
            .arg("--pidfile")
            .arg(dir.path().join("angel.pid"))
            .arg("--snapshot-dir")
            .arg(dir.path())
            .arg("--max-requests")
            .arg(cfg.max_requests.to_string())
            .arg("--max-requests-jitter")
            .arg(cfg.max_requests_jitter.to_string());
        let mut server = Self::spawn("angel-host", cmd, Some(dir))?;
        let (_, line) = server
            .wait_line(0, |l| l.contains("] listening on "))
            .context("angel-host did not log its address")?;
        server.addr = parse_addr(&line.text)?;
        server
            .wait_line(0, |l| l.contains("(generation 1,"))
            .context("angel-host did not start serving")?;
        Ok(server)
    }

    /// Starts `plain-hyper` with `processes` serving processes and waits for all of them;
    /// with `http1`, the minimal reference (hyper's `http1` connection, no auto builder).
    pub fn plain(bin: &Path, processes: usize, http1: bool) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["--addr", "127.0.0.1:0", "--processes"])
            .arg(processes.to_string());
        if http1 {
            cmd.arg("--http1");
        }
        let mut server = Self::spawn("plain-hyper", cmd, None)?;
        let (_, line) = server
            .wait_line(0, |l| l.contains(" listening on "))
            .context("plain-hyper did not log its address")?;
        server.addr = parse_addr(&line.text)?;
        let mut from = 0;
        for _ in 0..processes {
            let (at, _) = server
                .wait_line(from, |l| l.ends_with("] ready"))
                .context("plain-hyper did not get ready")?;
            from = at + 1;
        }
        Ok(server)
    }

    fn spawn(
        name: &'static str,
        mut cmd: Command,
        dir: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("{name}: no stderr pipe"))?;
        let log = Arc::new(Log::default());
        let sink = Arc::clone(&log);
        // Reads until EOF so the server never blocks on a full pipe.
        let reader = std::thread::Builder::new()
            .name(format!("{name}-stderr"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    match line {
                        Ok(line) => sink.push(line),
                        Err(_) => break,
                    }
                }
            })?;
        Ok(Self {
            name,
            child,
            log,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            reader: Some(reader),
            _dir: dir,
        })
    }

    /// Waits (bounded by [`START_TIMEOUT`]) for a log line; the error carries the log tail.
    pub fn wait_line(
        &mut self,
        from: usize,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<(usize, LogLine)> {
        if let Some(found) = self.log.wait_for(from, START_TIMEOUT, pred) {
            return Ok(found);
        }
        let status = self.child.try_wait().ok().flatten();
        bail!(
            "{} (pid {}, status {status:?}) timed out after {START_TIMEOUT:?}; its log:\n{}",
            self.name,
            self.pid(),
            self.log.tail(30)
        )
    }

    /// The pid of the process we started (angel-host's master, plain-hyper's parent).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process we started.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.pid())?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("kill -{signal} {pid}"))
    }

    /// The pids of the live serving processes: angel workers (forked minus exited/died in the
    /// log) or plain-hyper's children (their `ready` lines).
    pub fn serving_pids(&self) -> Vec<u32> {
        let lines = self.log.since(0);
        let mut pids = Vec::new();
        for line in &lines {
            let t = &line.text;
            if let Some(pid) = between(t, "forked worker[", "]") {
                pids.push(pid);
            } else if let Some(pid) = between(t, "plain[", "] ready") {
                pids.push(pid);
            } else if let Some(pid) = after_word(t, "] worker ") {
                if t.contains(" exited") || t.contains(" died") {
                    pids.retain(|p| *p != pid);
                }
            }
        }
        pids
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            let _ = self.signal(Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while self.child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    self.child.kill()?;
                    self.child.wait()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The socket address at the end of a `... listening on ADDR` line.
fn parse_addr(line: &str) -> anyhow::Result<SocketAddr> {
    let addr = line
        .rsplit(" listening on ")
        .next()
        .and_then(|rest| rest.split([',', ' ']).next())
        .ok_or_else(|| anyhow!("no address in {line:?}"))?;
    addr.parse()
        .with_context(|| format!("parsing the address in {line:?}"))
}

/// The number between `start` and `end` in `text`.
pub fn between(text: &str, start: &str, end: &str) -> Option<u32> {
    let rest = &text[text.find(start)? + start.len()..];
    rest[..rest.find(end)?].parse().ok()
}

/// The number right after `start` in `text`, up to the next non-digit.
pub fn after_word(text: &str, start: &str) -> Option<u32> {
    let rest = &text[text.find(start)? + start.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Where the bench finds the binaries it needs, by default beside itself.
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}
