//! Rebuilding and redeploying a served library, as a developer or an operator does it, and
//! watching what the host makes of it: the pieces the `watch`, `deploy` and `hup_storm` tests
//! share.
//!
//! - [`AppCrate`]: a private copy of the dependency-free fixture crate `tests/data/buildapp`
//!   (an ABI v1 app written by hand, std only), built with `cargo build --offline` in its own
//!   temp dir and target dir; a test edits its build marker and builds again.
//! - [`Deploy`]: the ways a new library lands on the served path (cargo's unlink + hard link,
//!   `cp`, `rsync --inplace`, `install`, an atomic rename).
//! - Log helpers for roll outcomes, and [`observe_quiet`]: the only way to show that something
//!   did *not* happen is to look for a while, so it serves requests and watches the log for a
//!   bounded window (a slow host can make it miss a wrong roll, never fail a correct one).

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::http::get;
use crate::{Host, WAIT};

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
        let pid = crate::body::hello_pid(&resp.text());
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
