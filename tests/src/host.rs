//! Spawning `angel-host`, reading its log, signalling it, and cleaning up after it.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::exit::Captured;
pub use crate::exit::Exit;
use crate::http::Addr;
use crate::log::{ended_pids, forked_pids, generation_of, pid_running, ready_pids, sha_of};
use crate::{host_bin, poll, poll_for, START_TIMEOUT};

/// How long `Drop` lets a master stop on SIGINT before it SIGKILLs everything.
const DROP_GRACE: Duration = Duration::from_secs(10);
/// How long an exited master's pipe readers get to read what is left before the last look.
const PIPE_DRAIN: Duration = Duration::from_secs(2);

/// Builds an `angel-host` command line with safe test defaults: `--port 0 --host 127.0.0.1`
/// (unless `--port`, `--host` or `--path` is given), `--pidfile <dir>/angel.pid`, `--workers 2`,
/// cwd = a fresh temp dir.
#[derive(Debug)]
pub struct HostBuilder {
    lib: Option<PathBuf>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<PathBuf>,
    refuse_clone_parent: bool,
}

fn has(args: &[OsString], flag: &str) -> bool {
    args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.starts_with(&format!("{flag}="))
    })
}

impl HostBuilder {
    /// Adds one argument.
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the master (and so its workers).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    /// Runs under a seccomp filter that refuses `clone(CLONE_PARENT)` ([`crate::seccomp`]).
    pub fn refuse_clone_parent(mut self) -> Self {
        self.refuse_clone_parent = true;
        self
    }

    /// Runs in `dir` (the caller keeps it alive) instead of a fresh temp dir.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    fn command(&self) -> (Command, Option<TempDir>, PathBuf, PathBuf) {
        let tmp = match &self.dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().expect("tempdir")),
        };
        let dir = match (&self.dir, &tmp) {
            (Some(d), _) => d.clone(),
            (None, Some(t)) => t.path().to_path_buf(),
            (None, None) => unreachable!(),
        };
        let mut args = self.args.clone();
        if let Some(lib) = &self.lib {
            args.splice(0..0, [OsString::from("--lib"), lib.clone().into()]);
        }
        let unix = has(&args, "--path");
        if !unix && !has(&args, "--port") {
            args.extend(["--port".into(), "0".into()]);
        }
        if !unix && !has(&args, "--host") {
            args.extend(["--host".into(), "127.0.0.1".into()]);
        }
        let pidfile = dir.join("angel.pid");
        if !has(&args, "--pidfile") {
            args.extend(["--pidfile".into(), pidfile.clone().into()]);
        }
        if !has(&args, "--workers") && !has(&args, "--check") {
            args.extend(["--workers".into(), "2".into()]);
        }
        let mut cmd = Command::new(host_bin());
        // Only the test decides the configuration: no ANGEL_* leaks in from the environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ANGEL_") {
                cmd.env_remove(k);
            }
        }
        // Panics in apps print one line, not a backtrace, unless a test asks otherwise.
        cmd.env("RUST_BACKTRACE", "0");
        cmd.args(&args)
            .current_dir(&dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: Drop can SIGKILL stragglers without touching anything else.
            .process_group(0);
        if self.refuse_clone_parent {
            crate::seccomp::refuse_clone_parent(&mut cmd);
        }
        (cmd, tmp, dir, pidfile)
    }

    /// Spawns the master without waiting for anything.
    pub fn spawn(self) -> Host {
        let (mut cmd, tmp, dir, pidfile) = self.command();
        let mut child = cmd.spawn().expect("spawn angel-host");
        let stderr = Captured::spawn_reader(child.stderr.take().expect("stderr piped"));
        let stdout = Captured::spawn_reader(child.stdout.take().expect("stdout piped"));
        Host {
            pid: child.id() as i32,
            child: Mutex::new(child),
            status: Mutex::new(None),
            stderr,
            stdout,
            addr: None,
            dir,
            pidfile,
            _tmp: tmp,
        }
    }

    /// Spawns the master and waits until generation 1 serves; parses the listening address.
    pub fn start(self) -> Host {
        let mut host = self.spawn();
        host.wait_line_since(0, START_TIMEOUT, "`serving ... (generation 1`", |l| {
            l.contains(" serving ") && l.contains("(generation 1")
        });
        host.addr = Some(crate::listening_addr(&host.log()));
        host
    }

    /// Runs to exit (bounded by `timeout`) and returns status, stdout and stderr.
    pub fn run_to_exit(self, timeout: Duration) -> Exit {
        let host = self.spawn();
        let status = host.wait_exit(timeout);
        Exit {
            status,
            stdout: host.stdout_text(),
            stderr: host.log(),
        }
    }
}

/// Runs `angel-host <args>` (plus the test defaults, see [`HostBuilder`]) to exit, bounded by
/// `timeout`: for start-up error cases.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> Exit {
    Host::builder_without_lib().args(args).run_to_exit(timeout)
}

/// A running `angel-host` master. Dropping it stops it (SIGINT, then SIGKILL) and SIGKILLs every
/// process it spawned.
#[derive(Debug)]
pub struct Host {
    /// The master's pid.
    pub pid: i32,
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    stderr: Arc<Captured>,
    stdout: Arc<Captured>,
    addr: Option<Addr>,
    dir: PathBuf,
    pidfile: PathBuf,
    _tmp: Option<TempDir>,
}

impl Host {
    /// A builder for `angel-host --lib <lib>`.
    pub fn builder(lib: impl AsRef<Path>) -> HostBuilder {
        HostBuilder {
            lib: Some(lib.as_ref().to_path_buf()),
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            refuse_clone_parent: false,
        }
    }

    /// A builder without `--lib` (for usage-error tests).
    pub fn builder_without_lib() -> HostBuilder {
        HostBuilder {
            lib: None,
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            refuse_clone_parent: false,
        }
    }

    /// `angel-host --lib <lib> <extra_args>` with the test defaults, started and serving.
    pub fn start(lib: impl AsRef<Path>, extra_args: &[&str]) -> Host {
        Host::builder(lib).args(extra_args).start()
    }

    /// Where generation 1 listens (from the master's log).
    pub fn addr(&self) -> &Addr {
        self.addr.as_ref().expect("host was spawned, not started")
    }

    /// The host's working dir (a temp dir unless the builder was given one).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The default pidfile path (`<dir>/angel.pid`).
    pub fn pidfile(&self) -> &Path {
        &self.pidfile
    }

    /// Everything the master (and its workers) wrote to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.get()
    }

    /// Everything written to stdout so far.
    pub fn stdout_text(&self) -> String {
        self.stdout.get()
    }

    /// A position in the log; pass it to the `*_since` methods.
    pub fn mark(&self) -> usize {
        self.stderr.text.lock().expect("capture lock").len()
    }

    /// The log after `mark`.
    pub fn log_since(&self, mark: usize) -> String {
        self.log()[mark..].to_string()
    }

    /// The exit status if the master has exited.
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().expect("status lock");
        if status.is_none() {
            *status = self
                .child
                .lock()
                .expect("child lock")
                .try_wait()
                .expect("try_wait");
        }
        *status
    }

    /// Waits for the first line after `mark` satisfying `pred`; panics with the log on timeout
    /// or when the master exits without ever logging it.
    pub fn wait_line_since(
        &self,
        mark: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let find = || {
            self.log_since(mark)
                .lines()
                .find(|l| pred(l))
                .map(str::to_string)
        };
        poll(
            timeout,
            what,
            || format!("--- master stderr ---\n{}", self.log()),
            || {
                if let Some(line) = find() {
                    return Some(line);
                }
                let status = self.try_status()?;
                // Let the reader drain the pipe before the last look.
                poll_for(PIPE_DRAIN, || {
                    self.stderr.eof.load(Ordering::SeqCst).then_some(())
                });
                Some(find().unwrap_or_else(|| {
                    panic!(
                        "master exited ({status}) before logging {what}\n--- master stderr \
                         ---\n{}",
                        self.log()
                    )
                }))
            },
        )
    }

    /// Waits for a log line (anywhere in the log) containing `pat`; returns it.
    pub fn wait_log(&self, pat: &str, timeout: Duration) -> String {
        self.wait_log_since(0, pat, timeout)
    }

    /// Waits for a log line after `mark` containing `pat`; returns it.
    pub fn wait_log_since(&self, mark: usize, pat: &str, timeout: Duration) -> String {
        self.wait_line_since(mark, timeout, &format!("{pat:?}"), |l| l.contains(pat))
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("signal the master");
    }

    /// Sends SIGHUP and returns the log mark taken just before.
    pub fn hup(&self) -> usize {
        let mark = self.mark();
        self.signal(Signal::SIGHUP);
        mark
    }

    /// Sends SIGHUP and waits for its outcome: `Ok(roll)` on `reloaded`, `Err(line)` on
    /// `reload failed` / `reload skipped` (any line saying `keeping generation`).
    pub fn hup_outcome(&self, timeout: Duration) -> Result<Roll, String> {
        let mark = self.hup();
        // Any `keeping generation` line ends the wait, so a misworded failure fails fast.
        let line = self.wait_line_since(mark, timeout, "`reloaded` or `reload failed`", |l| {
            l.starts_with("master[")
                && (l.contains(" reloaded ")
                    || l.contains(" reload failed")
                    || l.contains("keeping generation"))
        });
        if !line.contains(" reloaded ") {
            return Err(line);
        }
        let log = self.log_since(mark);
        let before_reloaded = &log[..log.find(&line).expect("line is in the log")];
        Ok(Roll {
            generation: generation_of(&line)
                .unwrap_or_else(|| panic!("no `(generation N` in {line:?}")),
            sha: sha_of(&line),
            new_pids: ready_pids(before_reloaded),
            line,
            mark,
        })
    }

    /// SIGHUP that must succeed; panics with the log otherwise.
    pub fn roll(&self, timeout: Duration) -> Roll {
        self.hup_outcome(timeout).unwrap_or_else(|line| {
            panic!("roll failed: {line}\n--- master stderr ---\n{}", self.log())
        })
    }

    /// Waits until the master logged `worker W exited` for every pid in `pids`.
    pub fn wait_exited(&self, pids: &[i32], timeout: Duration) {
        for pid in pids {
            self.wait_log(&format!("worker {pid} exited"), timeout);
        }
    }

    /// Pids of workers that reported ready and have not been logged as exited or died, and are
    /// still running.
    pub fn worker_pids(&self) -> Vec<i32> {
        let log = self.log();
        let ended = ended_pids(&log);
        ready_pids(&log)
            .into_iter()
            .filter(|p| !ended.contains(p) && pid_running(*p))
            .collect()
    }

    /// Waits (bounded) for the master to exit.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let status = poll(
            timeout,
            "angel-host to exit",
            || format!("--- master stderr ---\n{}", self.log()),
            || self.try_status(),
        );
        // Both pipes: `--check` prints its verdict on stdout, read by its own thread.
        poll_for(PIPE_DRAIN, || {
            (self.stderr.eof.load(Ordering::SeqCst) && self.stdout.eof.load(Ordering::SeqCst))
                .then_some(())
        });
        status
    }

    /// Every pid the log names as a worker.
    pub fn all_worker_pids_seen(&self) -> Vec<i32> {
        let log = self.log();
        let mut pids = forked_pids(&log);
        pids.extend(ready_pids(&log));
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGINT);
            if poll_for(DROP_GRACE, || self.try_status()).is_none() {
                let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
                let _ = self.child.lock().map(|mut c| c.wait());
            }
        }
        let exe = host_bin();
        for pid in self.all_worker_pids_seen() {
            // Only processes still running our binary: never a recycled pid.
            if std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == exe) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // Anything else left in the master's process group.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        if std::thread::panicking() {
            eprintln!("--- angel-host stderr ---\n{}--- end ---", self.log());
        }
    }
}

/// The outcome of a successful roll.
#[derive(Debug, Clone)]
pub struct Roll {
    /// The new generation number.
    pub generation: u64,
    /// The sha named in the `reloaded` line.
    pub sha: Option<String>,
    /// Workers that reported ready between the SIGHUP and the `reloaded` line.
    pub new_pids: Vec<i32>,
    /// The `reloaded` line.
    pub line: String,
    /// The log mark taken before the SIGHUP.
    pub mark: usize,
}
