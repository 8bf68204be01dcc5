//! Operating a running host as an operator would: the `reload` / `stop` / `status` commands
//! ([`ctl`]; `status --json` is read in [`crate::status`]), a master started with exactly the given arguments (for `--config`
//! tests, where the [`HostBuilder`](crate::HostBuilder) defaults would override the file), and
//! `--log-format json` lines.

use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::http::Addr;
use crate::log::{forked_pids, pid_running};
use crate::{host_bin, poll, poll_for, Exit, START_TIMEOUT};

/// Bound on one `angel-host reload|stop|status` command (a reload waits for a whole roll).
pub const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// A `Command` for `angel-host <args>` exactly (no test defaults), without `ANGEL_*` variables
/// from the environment, in `dir` if given.
fn host_command<I, S>(dir: Option<&Path>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    bin_command(&host_bin(), dir, args)
}

/// [`host_command`] for another copy of the binary (self-upgrade tests run from a copy).
pub fn bin_command<I, S>(bin: &Path, dir: Option<&Path>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin);
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
    // On timeout the context kills the child, so its output pipes close and can be joined.
    let child = RefCell::new(child);
    let output = RefCell::new(Some((stdout, stderr)));
    let status = poll(
        timeout,
        &format!("{what} to exit"),
        || {
            let mut child = child.borrow_mut();
            let _ = child.kill();
            let _ = child.wait();
            let (stdout, stderr) = output.borrow_mut().take().expect("output taken once");
            format!(
                "--- stdout ---\n{}\n--- stderr ---\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            )
        },
        || child.borrow_mut().try_wait().expect("try_wait"),
    );
    let (stdout, stderr) = output.into_inner().expect("output");
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

/// Waits until none of `pids` runs any more (zombies count as gone).
pub fn wait_pids_gone(pids: &[i32], timeout: Duration, context: impl Fn() -> String) {
    poll(
        timeout,
        &format!("processes {pids:?} to exit"),
        context,
        || pids.iter().all(|p| !pid_running(*p)).then_some(()),
    );
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
        RawHost::spawn_bin(&host_bin(), dir, args, env)
    }

    /// [`RawHost::spawn_with_env`] from another copy of the binary.
    pub fn spawn_bin<I, S>(bin: &Path, dir: &Path, args: I, env: &[(&str, &str)]) -> RawHost
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = bin_command(bin, Some(dir), args);
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

    /// [`RawHost::spawn_bin`], waiting until generation 1 serves.
    pub fn start_bin<I, S>(bin: &Path, dir: &Path, args: I) -> RawHost
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut host = RawHost::spawn_bin(bin, dir, args, &[]);
        host.wait_log_since(0, "(generation 1", START_TIMEOUT);
        host.addr = Some(crate::listening_addr(&host.log()));
        host
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
            if poll_for(Duration::from_secs(10), || self.try_status()).is_none() {
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
    }
}
