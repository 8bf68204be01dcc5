//! Rebuilding and redeploying a served library, as a developer or an operator does it, and
//! watching what the host makes of it: the pieces the `watch`, `deploy` and `hup_storm` tests
//! share.
//!
//! - [`AppCrate`]: a private copy of the dependency-free fixture crate `tests/data/buildapp`
//!   (an ABI v1 app written by hand, std only), built with `cargo build --offline` in its own
//!   temp dir and target dir; a test edits its build marker and builds again.
//! - [`Deploy`]: the ways a new library lands on the served path (cargo's unlink + hard link,
//!   `cp`, `rsync --inplace`, `install`, an atomic rename).
//! - [`Load`]: client threads, one new connection per request, that record every failure and
//!   the first time each kind of body was seen.
//! - [`status`] (`angel-host status --json`, read with a minimal [`Json`] reader) and [`ctl`]
//!   (any `angel-host <command> --pidfile ...`), both bounded.
//! - Log helpers for roll outcomes, and [`observe_quiet`]: the only way to show that something
//!   did *not* happen is to look for a while, so it serves requests and watches the log for a
//!   bounded window (a slow host can make it miss a wrong roll, never fail a correct one).

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::http::{get, Addr};
use crate::{Exit, Host, WAIT};

/// The fixture crate's manifest (its own `[workspace]`, no dependency).
const BUILDAPP_MANIFEST: &str = include_str!("../data/buildapp/Cargo.toml");
/// The fixture crate's source; [`BUILD_LINE`] is the line a test rewrites.
const BUILDAPP_SOURCE: &str = include_str!("../data/buildapp/src/lib.rs");
/// The marker line in [`BUILDAPP_SOURCE`] as committed.
const BUILD_LINE: &str = "const BUILD: &str = \"build-1\";";
/// Bound on one `cargo build` of the fixture (from scratch on a loaded 2-core CI box).
pub const CARGO_TIMEOUT: Duration = Duration::from_secs(120);

/// A copy of `tests/data/buildapp` in a temp dir, built there with its own target dir.
#[derive(Debug)]
pub struct AppCrate {
    dir: TempDir,
}

impl AppCrate {
    /// Writes the crate (marker `build-1`) into a fresh temp dir; nothing tracked is touched.
    pub fn new() -> AppCrate {
        let dir = tempfile::Builder::new()
            .prefix("angel-buildapp.")
            .tempdir()
            .expect("tempdir");
        assert!(
            BUILDAPP_SOURCE.contains(BUILD_LINE),
            "tests/data/buildapp/src/lib.rs lost its marker line {BUILD_LINE:?}"
        );
        std::fs::create_dir(dir.path().join("src")).expect("mkdir src");
        std::fs::write(dir.path().join("Cargo.toml"), BUILDAPP_MANIFEST).expect("write manifest");
        let app = AppCrate { dir };
        app.set_build("build-1");
        app
    }

    /// The crate's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Rewrites the source so that every response body starts with `marker`.
    pub fn set_build(&self, marker: &str) {
        let source =
            BUILDAPP_SOURCE.replace(BUILD_LINE, &format!("const BUILD: &str = {marker:?};"));
        std::fs::write(self.dir.path().join("src/lib.rs"), source).expect("write src/lib.rs");
    }

    /// `<dir>/target/debug/libbuildapp.so`, where cargo puts the build.
    pub fn lib(&self) -> PathBuf {
        self.dir.path().join("target/debug/libbuildapp.so")
    }

    /// Runs `cargo build --offline` (bounded); returns when cargo finished. Panics with cargo's
    /// output if it fails.
    pub fn build(&self) -> Instant {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--offline", "--quiet"])
            .current_dir(self.dir.path())
            .env("CARGO_TARGET_DIR", self.dir.path().join("target"))
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .env("CARGO_TERM_COLOR", "never");
        let out =
            crate::ops::run_bounded(cmd, CARGO_TIMEOUT, "cargo build of the buildapp fixture");
        let done = Instant::now();
        assert!(
            out.status.success(),
            "cargo build of {} failed ({}):\n{}\n{}",
            self.dir.path().display(),
            out.status,
            out.stdout,
            out.stderr
        );
        done
    }
}

impl Default for AppCrate {
    fn default() -> Self {
        AppCrate::new()
    }
}

/// Runs `angel-host <args> --pidfile <host's pidfile>` to exit (bounded by
/// [`crate::ops::CTL_TIMEOUT`]).
pub fn ctl(host: &Host, args: &[&str]) -> Exit {
    crate::ops::ctl(host.pidfile(), args)
}

/// Ways of putting a new library on the served path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deploy {
    /// What cargo does: the build lands in `deps/`, the served path is unlinked and
    /// hard-linked to it (a new inode; the path is absent for a moment).
    CargoRelink,
    /// `cp new target`: truncates and rewrites the served inode in place.
    Cp,
    /// `rsync --inplace new target`: writes over the served inode without truncating first,
    /// then cuts it to length (emulated faithfully when rsync is not installed).
    RsyncInplace,
    /// `install -m 755 new target`.
    Install,
    /// Write a temp file beside the target, then `rename(2)` it over the target (atomic).
    Rename,
}

impl Deploy {
    /// Whether the served path goes from the old complete file to the new complete file in
    /// one step (no reader can see a half-written library).
    pub fn atomic(self) -> bool {
        matches!(self, Deploy::CargoRelink | Deploy::Rename)
    }

    /// Whether the served path keeps its inode number: `Some(true)` for in-place writes,
    /// `Some(false)` when the new inode exists before the old one is unlinked, `None` for
    /// `install` (it unlinks first, then creates: the number may be recycled at once).
    pub fn keeps_inode(self) -> Option<bool> {
        match self {
            Deploy::Cp | Deploy::RsyncInplace => Some(true),
            Deploy::CargoRelink | Deploy::Rename => Some(false),
            Deploy::Install => None,
        }
    }

    /// Deploys `src` onto `target`; returns a description of what was done (for the output).
    pub fn apply(self, src: &Path, target: &Path) -> String {
        let dir = target.parent().expect("target has a directory");
        let name = target.file_name().expect("target has a file name");
        match self {
            Deploy::CargoRelink => {
                let deps = dir.join("deps");
                std::fs::create_dir_all(&deps).expect("mkdir deps");
                let mut built = deps.join(name);
                built.as_mut_os_string().push(".new");
                let _ = std::fs::remove_file(&built);
                std::fs::copy(src, &built).expect("build into deps/");
                match std::fs::remove_file(target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("unlink {}: {e}", target.display()),
                }
                std::fs::hard_link(&built, target).expect("hard link deps/ build");
                "unlink + hard link of a new inode (cargo style)".into()
            }
            Deploy::Cp => {
                run_tool(Command::new("cp").arg(src).arg(target));
                "cp (same inode, truncated and rewritten)".into()
            }
            Deploy::RsyncInplace => {
                if which("rsync") {
                    run_tool(Command::new("rsync").arg("--inplace").arg(src).arg(target));
                    "rsync --inplace (real rsync)".into()
                } else if std::env::var_os("ANGEL_TEST_REQUIRE_RSYNC").is_some_and(|v| v == "1") {
                    panic!("rsync is not installed and ANGEL_TEST_REQUIRE_RSYNC=1");
                } else {
                    let bytes = std::fs::read(src).expect("read new library");
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(target)
                        .expect("open target without truncating");
                    f.write_all(&bytes).expect("write in place");
                    f.set_len(bytes.len() as u64).expect("cut to length");
                    "rsync --inplace EMULATED (rsync not installed): write over the inode, \
                     then set_len"
                        .into()
                }
            }
            Deploy::Install => {
                run_tool(
                    Command::new("install")
                        .args(["-m", "755"])
                        .arg(src)
                        .arg(target),
                );
                "install -m 755".into()
            }
            Deploy::Rename => {
                let mut tmp = target.to_path_buf();
                tmp.as_mut_os_string().push(".tmp-deploy");
                std::fs::copy(src, &tmp).expect("write temp file");
                std::fs::rename(&tmp, target).expect("rename over the target");
                "temp file + rename(2) over the target".into()
            }
        }
    }
}

fn run_tool(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `tool` is on `PATH`.
pub fn which(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool)).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
    })
}

/// Where the loadable part of an ELF64 little-endian shared object ends: the end of its last
/// `PT_LOAD` segment in the file. A debug cdylib is mostly debug info after that point, so
/// cutting it in half still leaves a library that loads; a copy cut short *inside* this range
/// cannot be loaded.
pub fn elf_loadable_len(elf: &[u8]) -> usize {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().expect("2 bytes")) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes")) as usize;
    assert!(
        elf.starts_with(b"\x7fELF") && elf[4] == 2 && elf[5] == 1,
        "not an ELF64 little-endian file"
    );
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32_at(ph) == 1)
        .map(|ph| u64_at(ph + 8) + u64_at(ph + 32))
        .max()
        .expect("no PT_LOAD segment")
}

/// The inode of `path`.
pub fn inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// The first 8 hex digits of the file's SHA-256 (what the master logs as `sha`).
pub fn short_sha(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)[..8].to_string()
}

/// What kind of answer a body is: the text before its first `:` (`Hello:123` → `Hello`,
/// `build-2:123` → `build-2`), or the whole trimmed body (`Hello from angel-host`).
pub fn body_kind(body: &str) -> String {
    let body = body.trim();
    body.split_once(':').map_or(body, |(k, _)| k).to_string()
}

#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    first_seen: Mutex<Vec<(String, Instant)>>,
}

/// Concurrent clients, each sending `GET /` on a new connection after the other, until
/// stopped. Every error or non-2xx answer is recorded as a failure.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

/// What a [`Load`] saw.
#[derive(Debug)]
pub struct LoadReport {
    /// Requests answered 2xx.
    pub ok: u64,
    /// Every failed request, with the time since the load started.
    pub failures: Vec<String>,
    /// When each [`body_kind`] was first answered.
    pub first_seen: Vec<(String, Instant)>,
}

impl Load {
    /// Starts `clients` client threads against `addr`.
    pub fn start(addr: &Addr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let started = Instant::now();
        let threads = (0..clients)
            .map(|c| {
                let (addr, stop, tally) = (addr.clone(), stop.clone(), tally.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match get(&addr, "/") {
                            Ok(resp) => {
                                let kind = body_kind(&resp.text());
                                let mut seen = tally.first_seen.lock().expect("tally");
                                if !seen.iter().any(|(k, _)| *k == kind) {
                                    seen.push((kind, Instant::now()));
                                }
                                drop(seen);
                                tally.ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => tally
                                .failures
                                .lock()
                                .expect("tally")
                                .push(format!("client {c} at {:?}: {e}", started.elapsed())),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.tally.ok.load(Ordering::SeqCst)
    }

    /// Failures so far.
    pub fn failures(&self) -> Vec<String> {
        self.tally.failures.lock().expect("tally").clone()
    }

    /// When a body of this kind was first answered.
    pub fn first_seen(&self, kind: &str) -> Option<Instant> {
        let seen = self.tally.first_seen.lock().expect("tally");
        seen.iter().find(|(k, _)| k == kind).map(|(_, t)| *t)
    }

    /// Waits (bounded by [`WAIT`]) until `n` more requests were answered.
    pub fn wait_more(&self, host: &Host, n: u64) {
        let want = self.ok() + n;
        crate::wait_until(host, WAIT, &format!("{n} more answered requests"), || {
            (self.ok() >= want).then_some(())
        });
    }

    /// Stops the clients and reports.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("client thread");
        }
        LoadReport {
            ok: self.tally.ok.load(Ordering::SeqCst),
            failures: self.tally.failures.lock().expect("tally").clone(),
            first_seen: self.tally.first_seen.lock().expect("tally").clone(),
        }
    }
}

impl LoadReport {
    /// Panics (with the host's log) unless every request succeeded and at least `min` did.
    pub fn assert_clean(&self, host: &Host, min: u64) {
        assert!(
            self.failures.is_empty(),
            "{} of {} requests failed: {:#?}\n--- master stderr ---\n{}",
            self.failures.len(),
            self.ok + self.failures.len() as u64,
            &self.failures[..self.failures.len().min(10)],
            host.log()
        );
        assert!(
            self.ok >= min,
            "only {} requests answered (wanted ≥ {min})",
            self.ok
        );
    }
}

/// Whether a master line ends a roll: `reloaded`, `reload failed`, `reload skipped` (any
/// `keeping generation`).
pub fn is_roll_outcome(line: &str) -> bool {
    line.starts_with("master[")
        && (line.contains(" reloaded ")
            || line.contains(" reload failed")
            || line.contains(" reload skipped")
            || line.contains("keeping generation"))
}

/// Lines that show the master did something about a trigger: a signal, a fork, a roll outcome,
/// or the `still the build that failed` notice.
pub fn is_roll_activity(line: &str) -> bool {
    is_roll_outcome(line)
        || (line.starts_with("master[")
            && (line.contains("] SIGHUP")
                || line.contains(" forked worker[")
                || line.contains("still the build that failed")
                || line.contains("reload requested")))
}

/// Waits for the first roll outcome after `mark`: `Ok(line)` for `reloaded`, `Err(line)` for a
/// failed or skipped reload.
pub fn wait_outcome(host: &Host, mark: usize) -> Result<String, String> {
    let line = host.wait_line_since(mark, WAIT, "a roll outcome", is_roll_outcome);
    if line.contains(" reloaded ") {
        Ok(line)
    } else {
        Err(line)
    }
}

/// Waits for a `reloaded` line after `mark` that must be the first outcome there.
pub fn wait_reloaded(host: &Host, mark: usize) -> String {
    wait_outcome(host, mark).unwrap_or_else(|line| {
        panic!(
            "expected `reloaded`, got: {line}\n--- master stderr ---\n{}",
            host.log()
        )
    })
}

/// Waits for the `reloaded` line naming `sha` after `mark`, for deploys that write the served
/// file in place or non-atomically (`cp`, `rsync --inplace`, `install`): if the writer pauses
/// for longer than `--debounce`, the host may snapshot a half-written file, which it must then
/// refuse (`reload skipped` / `reload failed`, keeping the generation) before the finished file
/// rolls. Returns the `reloaded` line and those refusals; panics if a `reloaded` line for other
/// bytes comes first (a torn build served) or a refusal does not say `keeping generation`.
pub fn wait_rolled_to(host: &Host, mark: usize, sha: &str) -> (String, Vec<String>) {
    let want = format!(", sha {sha})");
    let line = host.wait_line_since(mark, WAIT, &format!("`reloaded` with sha {sha}"), |l| {
        is_roll_outcome(l) && l.contains(" reloaded ") && l.contains(&want)
    });
    let log = host.log_since(mark);
    let before = &log[..log.find(&line).expect("line in log")];
    let refused: Vec<String> = before
        .lines()
        .filter(|l| is_roll_outcome(l))
        .map(str::to_string)
        .collect();
    for r in &refused {
        assert!(
            !r.contains(" reloaded ") && r.contains("; keeping generation "),
            "a roll to other bytes than {sha} before the deploy finished: {r}\n--- master \
             stderr ---\n{}",
            host.log()
        );
    }
    (line, refused)
}

/// Serves requests and watches the log for `window`: every answer must come from `pids` and
/// the log after `mark` must show no roll activity. Returns the number of requests served.
pub fn observe_quiet(host: &Host, mark: usize, window: Duration, pids: &BTreeSet<i32>) -> u64 {
    let deadline = Instant::now() + window;
    let mut served = 0;
    while Instant::now() < deadline {
        let resp = get(host.addr(), "/").unwrap_or_else(|e| {
            panic!(
                "GET / while quiet: {e}\n--- master stderr ---\n{}",
                host.log()
            )
        });
        let pid = crate::hello_pid(&resp.text());
        assert!(
            pids.contains(&pid),
            "answered by {pid}, not one of {pids:?}: something rolled\n--- master stderr ---\n{}",
            host.log()
        );
        served += 1;
        let log = host.log_since(mark);
        if let Some(line) = log.lines().find(|l| is_roll_activity(l)) {
            panic!(
                "the master acted on a change that must not trigger: {line}\n--- master stderr \
                 ---\n{}",
                host.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    served
}

/// `master[P] forked worker[W]` lines in `log`.
pub fn count_forks(log: &str) -> usize {
    log.lines()
        .filter(|l| l.starts_with("master[") && l.contains(" forked worker["))
        .count()
}

/// `angel-host status --json`, parsed; panics with the host's log if the command fails.
pub fn status(host: &Host) -> Status {
    let out = ctl(host, &["status", "--json"]);
    assert!(
        out.status.success(),
        "angel-host status --json failed ({}): {}\n--- master stderr ---\n{}",
        out.status,
        out.stderr,
        host.log()
    );
    Status::parse(&out.stdout).unwrap_or_else(|e| {
        panic!("unreadable status {:?}: {e}", out.stdout);
    })
}

/// The fields of `status --json` the tests look at.
#[derive(Debug, Clone)]
pub struct Status {
    /// The master's pid.
    pub pid: i32,
    /// The serving generation.
    pub generation: u64,
    /// Full SHA-256 of the serving library.
    pub sha256: Option<String>,
    /// A roll is under way.
    pub rolling: bool,
    /// The master is stopping.
    pub stopping: bool,
    /// Every worker (probes excluded).
    pub workers: Vec<WorkerStatus>,
    /// The JSON as printed.
    pub raw: String,
}

/// One worker in [`Status`].
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// Its pid.
    pub pid: i32,
    /// Its slot.
    pub slot: u64,
    /// Its generation.
    pub generation: u64,
    /// `starting`, `ready`, `draining`, `killed`.
    pub state: String,
}

impl Status {
    /// Parses one `status --json` line.
    pub fn parse(text: &str) -> Result<Status, String> {
        let json = Json::parse(text)?;
        let num = |v: &Json, k: &str| {
            v.get(k)
                .and_then(Json::as_f64)
                .ok_or_else(|| format!("no number {k:?}"))
        };
        let flag = |k: &str| {
            json.get(k)
                .and_then(Json::as_bool)
                .ok_or_else(|| format!("no bool {k:?}"))
        };
        let workers = json
            .get("workers")
            .and_then(Json::as_array)
            .ok_or("no workers array")?
            .iter()
            .map(|w| {
                Ok(WorkerStatus {
                    pid: num(w, "pid")? as i32,
                    slot: num(w, "slot")? as u64,
                    generation: num(w, "generation")? as u64,
                    state: w
                        .get("state")
                        .and_then(Json::as_str)
                        .ok_or("no worker state")?
                        .to_string(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Status {
            pid: num(&json, "pid")? as i32,
            generation: num(&json, "generation")? as u64,
            sha256: json
                .get("sha256")
                .and_then(Json::as_str)
                .map(str::to_string),
            rolling: flag("rolling")?,
            stopping: flag("stopping")?,
            workers,
            raw: text.trim().to_string(),
        })
    }

    /// Settled: no roll under way, exactly `workers` workers, all `ready`, all of the serving
    /// generation (nothing starting, draining or killed left).
    pub fn is_settled(&self, workers: usize) -> bool {
        !self.rolling
            && !self.stopping
            && self.workers.len() == workers
            && self
                .workers
                .iter()
                .all(|w| w.state == "ready" && w.generation == self.generation)
    }
}

/// Polls `status --json` until it [is settled](Status::is_settled) (bounded by [`WAIT`]).
pub fn wait_settled(host: &Host, workers: usize) -> Status {
    let mut last = None;
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(host);
        if s.is_settled(workers) {
            return s;
        }
        if Instant::now() >= deadline {
            panic!(
                "status never settled to {workers} ready workers of one generation; last: {}\n\
                 --- master stderr ---\n{}",
                last.map_or(s.raw.clone(), |l: Status| l.raw),
                host.log()
            );
        }
        last = Some(s);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A JSON value: just enough of a reader for `status --json` (the harness has no serde).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Any number.
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, in order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses one JSON document (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at byte {}", p.i));
        }
        Ok(v)
    }

    /// A member of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    /// The boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The array.
    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", b as char, self.i))
        }
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(format!("bad literal at byte {}", self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(members));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    members.push((k, self.value()?));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(members));
                        }
                        _ => return Err(format!("expected , or }} at byte {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(format!("expected , or ] at byte {}", self.i)),
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(_) => {
                let start = self.i;
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|b| b.is_ascii_digit() || b"+-.eE".contains(b))
                {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .map(Json::Num)
                    .ok_or_else(|| format!("bad value at byte {start}"))
            }
            None => Err("unexpected end of JSON".into()),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if self.s.get(self.i) != Some(&b'"') {
            return Err(format!("expected a string at byte {}", self.i));
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let b = *self.s.get(self.i).ok_or("unterminated string")?;
            self.i += 1;
            match b {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self
                                .s
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or("bad \\u escape")?;
                            self.i += 4;
                            // Surrogate pairs never occur in what the host prints; keep going.
                            char::from_u32(hex).unwrap_or('\u{fffd}')
                        }
                        _ => return Err(format!("bad escape at byte {}", self.i)),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_is_read() {
        let line = r#"{"pid":26990,"uptime_secs":1.68,"generation":2,"lib":"/t/a \"b\"/x.so","library":null,"sha256":"1300ab","listening":["127.0.0.1:38595"],"rolling":false,"stopping":false,"configured_workers":2,"workers":[{"pid":26994,"slot":0,"generation":2,"state":"ready","age_secs":1.6e0,"requests":0},{"pid":26995,"slot":1,"generation":1,"state":"draining","age_secs":1.67,"requests":3}]}"#;
        let s = Status::parse(line).unwrap();
        assert_eq!((s.pid, s.generation), (26990, 2));
        assert_eq!(s.sha256.as_deref(), Some("1300ab"));
        assert_eq!(s.workers.len(), 2);
        assert_eq!(s.workers[1].state, "draining");
        assert!(!s.is_settled(2));
        let json = Json::parse(line).unwrap();
        assert_eq!(
            json.get("lib").and_then(Json::as_str),
            Some("/t/a \"b\"/x.so")
        );
        assert_eq!(json.get("library"), Some(&Json::Null));
    }

    #[test]
    fn body_kinds() {
        assert_eq!(body_kind("Hello:123"), "Hello");
        assert_eq!(body_kind("build-2:77\n"), "build-2");
        assert_eq!(
            body_kind("Hello from angel-host\n"),
            "Hello from angel-host"
        );
    }
}
