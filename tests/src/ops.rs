//! Operating a running host as an operator would: the `reload` / `stop` / `status` commands,
//! a concurrent client load, a master started with exactly the given arguments (for `--config`
//! tests, where the [`HostBuilder`](crate::HostBuilder) defaults would override the file), and
//! `--log-format json` lines.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::http::{get, Addr, Client};
use crate::log::{forked_pids, pid_running};
use crate::{host_bin, Exit, START_TIMEOUT};

/// Bound on one `angel-host reload|stop|status` command (a reload waits for a whole roll).
pub const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// A `Command` for `angel-host <args>` exactly (no test defaults), without `ANGEL_*` variables
/// from the environment, in `dir` if given.
fn host_command<I, S>(dir: Option<&Path>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(host_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ANGEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_BACKTRACE", "0")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd
}

/// Reads a pipe to its end on a thread.
fn collect(pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = BufReader::new(pipe).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `cmd` to exit with its output captured, bounded by `timeout`; panics (with its output)
/// if it does not exit in time.
pub fn run_bounded(mut cmd: Command, timeout: Duration, what: &str) -> Exit {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let stdout = collect(child.stdout.take().expect("stdout piped"));
    let stderr = collect(child.stderr.take().expect("stderr piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not exit within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Exit {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Runs `angel-host <args>` exactly as given (no test defaults) in `dir` to exit, bounded by
/// `timeout`; panics (with its output) if it does not exit in time.
pub fn run_exact<I, S>(dir: Option<&Path>, args: I, timeout: Duration) -> Exit
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    run_bounded(
        host_command(dir, &args),
        timeout,
        &format!("angel-host {args:?}"),
    )
}

/// `angel-host <command...> --pidfile <pidfile>` (e.g. `ctl(p, &["status", "--json"])`), run to
/// exit within [`CTL_TIMEOUT`].
pub fn ctl(pidfile: &Path, command: &[&str]) -> Exit {
    let mut args: Vec<OsString> = command.iter().map(OsString::from).collect();
    args.push("--pidfile".into());
    args.push(pidfile.into());
    run_exact(None, args, CTL_TIMEOUT)
}

/// `angel-host status --json` parsed; panics with the command's output unless it succeeded.
pub fn status_json(pidfile: &Path) -> Value {
    let out = ctl(pidfile, &["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "status --json failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.stdout,
        out.stderr
    );
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {:?}", out.stdout))
}

/// The `workers` of a status whose `state` is `state`, as `(pid, slot, generation)`.
pub fn status_workers(status: &Value, state: &str) -> Vec<(i32, u64, u64)> {
    status["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no workers array: {status}"))
        .iter()
        .filter(|w| w["state"] == state)
        .map(|w| {
            let num = |k: &str| {
                w[k].as_u64()
                    .unwrap_or_else(|| panic!("worker {k} is not a number: {w}"))
            };
            (num("pid") as i32, num("slot"), num("generation"))
        })
        .collect()
}

/// Polls `cond` until it returns `Some` or panics after `timeout` with `what` and `context()`.
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    context: impl Fn() -> String,
    mut cond: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until none of `pids` runs any more (zombies count as gone).
pub fn wait_pids_gone(pids: &[i32], timeout: Duration, context: impl Fn() -> String) {
    poll(
        timeout,
        &format!("processes {pids:?} to exit"),
        context,
        || pids.iter().all(|p| !pid_running(*p)).then_some(()),
    );
}

/// The pid in a `<anything>:<pid>` body (hello, crash-after-ready), if it is one.
pub fn body_pid(body: &str) -> Option<i32> {
    body.rsplit_once(':')
        .and_then(|(_, pid)| pid.trim().parse().ok())
}

/// The pid in a ticker line `worker[<pid>] ...`.
pub fn ticker_pid(line: &str) -> Option<i32> {
    line.strip_prefix("worker[")
        .and_then(|r| r.split_once(']'))
        .and_then(|(p, _)| p.parse().ok())
}

/// Parses what `{:?}` prints for a `Duration` (`100ms`, `1.6s`, `25.6s`, `800µs`).
pub fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ns") {
        (n, 1e-9)
    } else {
        (s.strip_suffix('s')?, 1.0)
    };
    num.parse::<f64>()
        .ok()
        .map(|v| Duration::from_secs_f64(v * scale))
}

/// Every line of a `--log-format json` log as an object; panics naming the first line that is
/// not one.
pub fn json_lines(log: &str) -> Vec<serde_json::Map<String, Value>> {
    log.lines()
        .enumerate()
        .map(|(i, line)| match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => map,
            Ok(other) => panic!("log line {} is JSON but not an object: {other}", i + 1),
            Err(e) => panic!(
                "log line {} is not JSON ({e}): {line:?}\n--- log ---\n{log}",
                i + 1
            ),
        })
        .collect()
}

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Successful (2xx) responses.
    pub ok: u64,
    /// Every failed request, with its error.
    pub failures: Vec<String>,
    /// Successful responses per answering worker pid.
    pub per_pid: BTreeMap<i32, u64>,
}

impl LoadReport {
    fn merge(&mut self, other: LoadReport) {
        self.ok += other.ok;
        self.failures.extend(other.failures);
        for (pid, n) in other.per_pid {
            *self.per_pid.entry(pid).or_default() += n;
        }
    }
}

/// Client threads sending `GET /` to a hello-style app (`<message>:<pid>` bodies) in a loop until
/// [`Load::finish`]: some keep one connection alive (reconnecting only when a response says
/// `Connection: close`), some open a new connection per request. Every failure is recorded;
/// nothing is retried.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<LoadReport>>,
}

/// Pause between two requests of one client thread: keeps a 2-core box responsive.
const LOAD_PACE: Duration = Duration::from_millis(2);

impl Load {
    /// Starts `keep_alive` keep-alive clients and `fresh` new-connection-per-request clients.
    pub fn start(addr: &Addr, keep_alive: usize, fresh: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..keep_alive + fresh)
            .map(|i| {
                let (stop, ok, addr) = (stop.clone(), ok.clone(), addr.clone());
                let reuse = i < keep_alive;
                std::thread::spawn(move || {
                    let mut report = LoadReport::default();
                    let mut client = Client::new(&addr);
                    // For failure messages: the worker and age of the keep-alive connection.
                    let (mut conn_pid, mut conn_uses, mut last_done) = (None, 0u64, Instant::now());
                    while !stop.load(Ordering::SeqCst) {
                        let connections = client.connections;
                        let sent = Instant::now();
                        let idle = sent - last_done;
                        let result = if reuse {
                            client.get("/")
                        } else {
                            get(&addr, "/")
                        };
                        last_done = Instant::now();
                        if client.connections != connections {
                            (conn_pid, conn_uses) = (None, 0);
                        }
                        match result {
                            Ok(resp) => match body_pid(&resp.text()) {
                                Some(pid) => {
                                    report.ok += 1;
                                    ok.fetch_add(1, Ordering::SeqCst);
                                    *report.per_pid.entry(pid).or_default() += 1;
                                    (conn_pid, conn_uses) = (Some(pid), conn_uses + 1);
                                }
                                None => report.failures.push(format!("bad body {:?}", resp.text())),
                            },
                            Err(e) if reuse => report.failures.push(format!(
                                "keep-alive client: {e} (request {} on a connection to worker \
                                 {conn_pid:?}, idle {idle:?} before it, failed after {:?})",
                                conn_uses + 1,
                                last_done - sent
                            )),
                            Err(e) => report.failures.push(format!(
                                "new-connection client: {e} (after {:?})",
                                last_done - sent
                            )),
                        }
                        std::thread::sleep(LOAD_PACE);
                    }
                    report
                })
            })
            .collect();
        Load { stop, ok, threads }
    }

    /// Successful responses so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops every client (each finishes its current request) and merges their reports.
    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut report = LoadReport::default();
        for t in self.threads {
            report.merge(t.join().expect("load client thread"));
        }
        report
    }
}

/// A master started with exactly the given arguments, in a directory the caller owns. Dropping
/// it stops it (SIGINT, then SIGKILL of its process group and of every worker it logged).
#[derive(Debug)]
pub struct RawHost {
    /// The master's pid.
    pub pid: i32,
    child: Mutex<Child>,
    exited: Mutex<Option<std::process::ExitStatus>>,
    stderr: Arc<Mutex<String>>,
    addr: Option<Addr>,
}

impl RawHost {
    /// Spawns `angel-host <args>` in `dir` without waiting for anything.
    pub fn spawn<I, S>(dir: &Path, args: I) -> RawHost
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        RawHost::spawn_with_env(dir, args, &[])
    }

    /// [`RawHost::spawn`] with extra environment variables (e.g. `ANGEL_WORKERS`).
    pub fn spawn_with_env<I, S>(dir: &Path, args: I, env: &[(&str, &str)]) -> RawHost
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = host_command(Some(dir), args);
        cmd.envs(env.iter().copied());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().expect("spawn angel-host");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr piped");
        let text = stderr.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut line = Vec::new();
            while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                text.lock()
                    .expect("capture lock")
                    .push_str(&String::from_utf8_lossy(&line));
                line.clear();
            }
        });
        // stdout is unused by a master; drop the pipe reader's end on a thread.
        let _ = collect(child.stdout.take().expect("stdout piped"));
        RawHost {
            pid: child.id() as i32,
            child: Mutex::new(child),
            exited: Mutex::new(None),
            stderr,
            addr: None,
        }
    }

    /// Spawns and waits until generation 1 serves; parses the listening address.
    pub fn start<I, S>(dir: &Path, args: I) -> RawHost
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        RawHost::start_with_env(dir, args, &[])
    }

    /// [`RawHost::start`] with extra environment variables.
    pub fn start_with_env<I, S>(dir: &Path, args: I, env: &[(&str, &str)]) -> RawHost
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut host = RawHost::spawn_with_env(dir, args, env);
        host.wait_log_since(0, "(generation 1", START_TIMEOUT);
        host.addr = Some(crate::listening_addr(&host.log()));
        host
    }

    /// Where it listens (from the log).
    pub fn addr(&self) -> &Addr {
        self.addr.as_ref().expect("host was spawned, not started")
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().expect("capture lock").clone()
    }

    /// A position in the log.
    pub fn mark(&self) -> usize {
        self.stderr.lock().expect("capture lock").len()
    }

    /// The log after `mark`.
    pub fn log_since(&self, mark: usize) -> String {
        self.log()[mark..].to_string()
    }

    /// The exit status, if the master exited.
    pub fn try_status(&self) -> Option<std::process::ExitStatus> {
        let mut exited = self.exited.lock().expect("status lock");
        if exited.is_none() {
            *exited = self
                .child
                .lock()
                .expect("child lock")
                .try_wait()
                .expect("try_wait");
        }
        *exited
    }

    /// Waits for a line after `mark` containing `pat`; panics with the log on timeout or if
    /// the master exits first.
    pub fn wait_log_since(&self, mark: usize, pat: &str, timeout: Duration) -> String {
        poll(
            timeout,
            &format!("{pat:?} in the log"),
            || format!("--- master stderr ---\n{}", self.log()),
            || {
                let found = self
                    .log_since(mark)
                    .lines()
                    .find(|l| l.contains(pat))
                    .map(str::to_string);
                if found.is_none() {
                    if let Some(status) = self.try_status() {
                        std::thread::sleep(Duration::from_millis(200));
                        panic!(
                            "master exited ({status}) before logging {pat:?}\n--- master stderr ---\n{}",
                            self.log()
                        );
                    }
                }
                found
            },
        )
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("signal the master");
    }
}

impl Drop for RawHost {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.try_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.try_status().is_none() {
                let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
                let _ = self.child.lock().map(|mut c| c.wait());
            }
        }
        let exe: PathBuf = host_bin();
        for pid in forked_pids(&self.log()) {
            if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == exe) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        if std::thread::panicking() {
            eprintln!("--- angel-host stderr ---\n{}--- end ---", self.log());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_durations_parse() {
        assert_eq!(
            parse_debug_duration("100ms"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            parse_debug_duration("1.6s"),
            Some(Duration::from_millis(1600))
        );
        assert_eq!(parse_debug_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_debug_duration("soon"), None);
        assert_eq!(body_pid("Hello:123"), Some(123));
        assert_eq!(ticker_pid("worker[42] drained"), Some(42));
    }
}
