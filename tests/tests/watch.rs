//! `--watch`: the host rolls by itself when the library changes on disk, and only then.
//!
//! - a real `cargo build` of a changed crate beside `angel-host --watch` rolls to the new build
//!   with no failed request;
//! - changes that do not match the reload matcher (the library's own path by default, or
//!   `--reload-regex`) roll nothing, even when the library's content changed behind the
//!   watcher's back; an invalid regex is a usage error;
//! - every kind of bad build that lands on the watched path is refused while the serving
//!   generation keeps answering with the same workers, and the next good build rolls;
//! - workers that die right after they got ready are respawned with backoff, not in a storm;
//! - a build that failed is not retried when the same bytes land again, only when asked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use angel_tests::ops::ctl;
use angel_tests::rebuild::*;
use angel_tests::*;

/// The debounce of tests that must show that a change did *not* trigger.
const SHORT_DEBOUNCE: &str = "50ms";
/// How long such a test looks for a roll that must not come: 20× [`SHORT_DEBOUNCE`].
const QUIET: Duration = Duration::from_secs(1);
/// The body of the app template (`lib("app")`), the "good build" of these tests.
const APP_BODY: &str = "Hello from angel-host\n";

/// `dir/libapp.so`, a copy of the hello example.
fn served_hello(dir: &Path) -> PathBuf {
    let served = dir.join("libapp.so");
    deploy(&lib("hello"), &served);
    served
}

/// Puts `src` on the watched path in one step (a rename over it), so that the host can only
/// ever snapshot the whole of it. (`deploy.rs` covers the non-atomic ways.)
fn land(src: &Path, served: &Path) {
    Deploy::Rename.apply(src, served);
}

/// A temp dir by its canonical path (the master logs resolved paths).
fn canonical_tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().canonicalize().expect("canonicalize tempdir");
    (dir, path)
}

fn live_pids(host: &Host, want: usize) -> BTreeSet<i32> {
    let pids: BTreeSet<i32> = host.worker_pids().into_iter().collect();
    assert_eq!(pids.len(), want, "live workers {pids:?}\n{}", host.log());
    pids
}

/// Once the `old` workers exited (until then they may still take a queued connection), `GET /`
/// must answer `want` (the whole body).
fn assert_body(host: &Host, old: &BTreeSet<i32>, want: &str) {
    host.wait_exited(&old.iter().copied().collect::<Vec<_>>(), WAIT);
    for i in 0..5 {
        let resp = get(host.addr(), "/")
            .unwrap_or_else(|e| panic!("GET #{i}: {e}\n--- master stderr ---\n{}", host.log()));
        assert_eq!(resp.text(), want, "GET #{i}\n{}", host.log());
    }
}

/// The one roll-activity line after `mark` must be `line`: nothing else was rolled, skipped
/// or signalled.
fn assert_only_roll(host: &Host, mark: usize, line: &str) {
    let log = host.log_since(mark);
    let outcomes: Vec<&str> = log.lines().filter(|l| is_roll_outcome(l)).collect();
    assert_eq!(outcomes, [line], "exactly one roll\n{}", host.log());
    assert!(
        !log.contains("] SIGHUP") && !log.contains("still the build that failed"),
        "no other activity\n{}",
        host.log()
    );
}

#[test]
fn cargo_rebuild_under_watch_rolls_with_zero_failed_requests() {
    let app = AppCrate::new();
    let first_build = Instant::now();
    app.build();
    eprintln!(
        "buildapp fixture: first cargo build (from scratch) took {} ms",
        first_build.elapsed().as_millis()
    );
    let host = Host::start(app.lib(), &["--watch"]);
    let old: Vec<i32> = live_pids(&host, 2).into_iter().collect();
    let load = Load::start(host.addr(), 0, 2);
    load.wait_more(&host, 30);
    assert!(load.first_seen("build-1").is_some());

    let mark = host.mark();
    let saved = Instant::now();
    app.set_build("build-2");
    let built = app.build();
    let line = wait_reloaded(&host, mark);
    let reloaded = Instant::now();
    assert!(
        line.contains(&app.lib().display().to_string()) && line.contains("(generation 2"),
        "{line}"
    );
    let first_new = wait_until(&host, WAIT, "a build-2 response", || {
        load.first_seen("build-2")
    });
    host.wait_exited(&old, WAIT);
    load.wait_more(&host, 30);
    for _ in 0..10 {
        let body = get(host.addr(), "/").expect("GET after the roll").text();
        assert!(body.starts_with("build-2:"), "{body:?}\n{}", host.log());
    }
    let report = load.finish();
    report.assert_clean(&host, 60);
    let ms = |d: Duration| d.as_millis();
    eprintln!(
        "cargo rebuild under --watch: source saved → cargo done {} ms; cargo done → `reloaded` \
         {} ms; cargo done → first build-2 response {} ms; {} requests, 0 failed",
        ms(built - saved),
        ms(reloaded.saturating_duration_since(built)),
        ms(first_new.saturating_duration_since(built)),
        report.ok
    );
}

#[test]
fn changes_beside_the_library_do_not_roll() {
    let (_dir, dir) = canonical_tempdir();
    let (_stash, stash) = canonical_tempdir();
    // The served path is a hard link of a file in an unwatched directory: writing through that
    // other name changes the served content without any event in the watched directory. From
    // then on, any trigger would roll to the new content, so a wrong trigger is visible.
    let hidden = stash.join("libapp.so");
    deploy(&lib("hello"), &hidden);
    let served = dir.join("libapp.so");
    std::fs::hard_link(&hidden, &served).expect("hard link");
    let host = Host::builder(&served)
        .dir(&dir)
        .args(["--watch", "--debounce", SHORT_DEBOUNCE])
        .start();
    let old = live_pids(&host, 2);
    deploy(&lib("ticker"), &hidden);
    assert_eq!(short_sha(&served), short_sha(&lib("ticker")));

    let mark = host.mark();
    std::fs::write(dir.join("libapp.d"), "libapp.so: src/lib.rs\n").unwrap();
    std::fs::write(dir.join("other.txt"), "x").unwrap();
    std::fs::rename(dir.join("other.txt"), dir.join("other.txt.old")).unwrap();
    std::fs::write(dir.join("libapp.so.tmp"), "not the library").unwrap();
    std::fs::remove_file(dir.join("libapp.so.tmp")).unwrap();
    std::fs::create_dir(dir.join("deps")).unwrap();
    std::fs::write(dir.join("deps/libapp-0123abcd.so"), "a build in deps/").unwrap();
    let served_quiet = observe_quiet(&host, mark, QUIET, &old);

    // A matching change: the only roll that follows is for it, to the content it wrote.
    land(&lib("app"), &served);
    let line = wait_reloaded(&host, mark);
    assert!(line.contains("(generation 2"), "{line}");
    assert_eq!(
        sha_of(&line).as_deref(),
        Some(short_sha(&lib("app")).as_str()),
        "{line}"
    );
    assert_only_roll(&host, mark, &line);
    assert_body(&host, &old, APP_BODY);
    eprintln!("{served_quiet} requests answered by the old workers while nothing rolled");
}

#[test]
fn reload_regex_chooses_which_changes_trigger() {
    let (_dir, dir) = canonical_tempdir();
    let served = served_hello(&dir);
    let host = Host::builder(&served)
        .dir(&dir)
        .args([
            "--watch",
            "--debounce",
            SHORT_DEBOUNCE,
            "--reload-regex",
            r"plugin\.so$",
        ])
        .start();
    let old = live_pids(&host, 2);

    // The library itself changes, but its path does not match: no roll.
    let mark = host.mark();
    Deploy::Cp.apply(&lib("app"), &served);
    observe_quiet(&host, mark, QUIET, &old);

    // A matching path appears: the host snapshots the library (which did change) and rolls.
    std::fs::write(dir.join("libplugin.so"), "plugin v1").unwrap();
    let line = wait_reloaded(&host, mark);
    assert!(
        line.contains("(generation 2") && line.contains(&served.display().to_string()),
        "{line}"
    );
    assert_only_roll(&host, mark, &line);
    assert_body(&host, &old, APP_BODY);
}

#[test]
fn an_invalid_reload_regex_is_a_usage_error() {
    let exit = Host::builder(lib("hello"))
        .args(["--watch", "--reload-regex", "lib(app"])
        .run_to_exit(WAIT);
    assert_eq!(exit.code(), 2, "{}", exit.stderr);
    assert!(
        exit.stderr.contains("lib(app") && exit.stderr.to_lowercase().contains("regex"),
        "names the pattern and the regex error: {}",
        exit.stderr
    );
}

/// A bad build, as it lands on the watched path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    /// One of the harness's bad libraries (`Missing` = the library is deleted).
    Lib(BadLib),
    /// A real build cut short in the middle of its loadable segments (a copy interrupted).
    Truncated,
    /// A real shared object of another program (no angel symbols).
    Foreign,
}

/// Which line a bad build must produce.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// Rejected before any worker started.
    Skipped,
    /// Started, and failed before its generation was ready.
    Failed,
}

impl Bad {
    /// Puts the bad build on the served path in one step (see [`land`]): what the host
    /// snapshots is exactly this bad build, never a half-copied mix.
    fn land(self, scratch: &Path, served: &Path) {
        match self {
            Bad::Lib(BadLib::Missing) => BadLib::Missing.deploy(scratch, served),
            Bad::Lib(bad) => land(&bad.create(scratch), served),
            Bad::Truncated => {
                let bytes = std::fs::read(lib("app")).unwrap();
                let half = scratch.join("half.so");
                std::fs::write(&half, &bytes[..elf_loadable_len(&bytes) / 2]).unwrap();
                land(&half, served);
            }
            Bad::Foreign => {
                let libz = Path::new("/lib/x86_64-linux-gnu/libz.so.1");
                let foreign = if libz.is_file() {
                    libz.to_path_buf()
                } else {
                    BadLib::NoSymbols.create(scratch)
                };
                land(&foreign, served);
            }
        }
    }
}

fn bad_build_while_watching(bad: Bad, outcome: Outcome, extra: &[&str]) {
    let (_dir, dir) = canonical_tempdir();
    let scratch = tempfile::tempdir().unwrap();
    let served = served_hello(&dir);
    let host = Host::builder(&served)
        .dir(&dir)
        .arg("--watch")
        .args(extra)
        .start();
    let old = live_pids(&host, 2);
    let load = Load::start(host.addr(), 0, 2);
    load.wait_more(&host, 10);

    let mark = host.mark();
    bad.land(scratch.path(), &served);
    let line = match wait_outcome(&host, mark) {
        Err(line) => line,
        Ok(line) => panic!(
            "{bad:?} replaced a good generation: {line}\n--- master stderr ---\n{}",
            host.log()
        ),
    };
    let word = match outcome {
        Outcome::Skipped => "skipped",
        Outcome::Failed => "failed",
    };
    let served_name = served.display().to_string();
    assert!(
        line.contains(&format!("] reload {word}: {served_name}: "))
            && line.ends_with("; keeping generation 1"),
        "expected `master[P] reload {word}: {served_name}: <why>; keeping generation 1`, got: \
         {line}"
    );
    match bad {
        Bad::Lib(BadLib::Missing) => assert!(line.contains(": no such file;"), "{line}"),
        Bad::Lib(BadLib::AbiV2) => assert!(line.to_lowercase().contains("abi"), "{line}"),
        _ => {}
    }
    // The failed generation's workers do not linger; the old ones serve on, unchanged.
    let failed: Vec<i32> = host
        .all_worker_pids_seen()
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    wait_until(
        &host,
        Duration::from_secs(10),
        "failed workers gone",
        || failed.iter().all(|p| !pid_running(*p)).then_some(()),
    );
    load.wait_more(&host, 10);
    for i in 0..10 {
        let resp = get(host.addr(), "/")
            .unwrap_or_else(|e| panic!("GET #{i} after {bad:?}: {e}\n{}", host.log()));
        let pid = hello_pid(&resp.text());
        assert!(old.contains(&pid), "answered by {pid}, not {old:?}");
    }
    assert_eq!(live_pids(&host, 2), old, "same workers");
    let ended: BTreeSet<i32> = ended_pids(&host.log()).into_iter().collect();
    assert!(
        ended.is_disjoint(&old),
        "no old worker ended\n{}",
        host.log()
    );

    // The next good build (the library reappears, for `Missing`) rolls.
    let mark = host.mark();
    land(&lib("app"), &served);
    let line = wait_reloaded(&host, mark);
    assert!(line.contains(&served_name), "{line}");
    assert_body(&host, &old, APP_BODY);
    load.wait_more(&host, 10);
    load.finish().assert_clean(&host, 30);
}

macro_rules! bad_build_tests {
    ($($name:ident: $bad:expr, $outcome:expr, $extra:expr;)*) => {$(
        #[test]
        fn $name() {
            bad_build_while_watching($bad, $outcome, $extra);
        }
    )*};
}

bad_build_tests! {
    watched_library_deleted_is_skipped_until_it_reappears:
        Bad::Lib(BadLib::Missing), Outcome::Skipped, &[];
    watched_truncated_library_is_skipped: Bad::Truncated, Outcome::Skipped, &[];
    watched_zero_byte_file_is_skipped: Bad::Lib(BadLib::Empty), Outcome::Skipped, &[];
    watched_text_file_is_skipped: Bad::Lib(BadLib::Text), Outcome::Skipped, &[];
    watched_foreign_shared_object_is_skipped: Bad::Foreign, Outcome::Skipped, &[];
    watched_abi_v2_library_is_skipped: Bad::Lib(BadLib::AbiV2), Outcome::Skipped, &[];
    watched_panic_in_init_fails_the_roll: Bad::Lib(BadLib::PanicInit), Outcome::Failed, &[];
    watched_segfault_in_init_fails_the_roll: Bad::Lib(BadLib::Segfault), Outcome::Failed, &[];
    watched_never_ready_fails_the_roll:
        Bad::Lib(BadLib::NeverReady), Outcome::Failed, &["--ready-timeout", "2s"];
    watched_exit_after_ready_fails_the_roll:
        Bad::Lib(BadLib::ExitAfterReady), Outcome::Failed, &[];
}

/// A C app (built against the real `angel.h`) that reports ready and then, as soon as the
/// file named by `$CRASHLOOP_FLAG` exists (checked every 10 ms), returns at once: with the flag
/// present, every worker exits right after it reported ready.
const CRASH_AFTER_READY_C: &str = r#"
#include <poll.h>
#include <stdlib.h>
#include <unistd.h>
ANGEL_EXPORT const uint32_t angel_abi_version = ANGEL_ABI_VERSION;
ANGEL_EXPORT int32_t angel_main(const angel_context *ctx) {
    const char *flag = getenv("CRASHLOOP_FLAG");
    ctx->host.notify(ctx->host.data, ANGEL_EVENT_READY, 0);
    for (;;) {
        if (flag && access(flag, F_OK) == 0) return ANGEL_EXIT_OK;
        struct pollfd p = { .fd = ctx->drain_fd, .events = POLLIN };
        if (poll(&p, 1, 10) > 0) return ANGEL_EXIT_OK;
    }
}
"#;

/// `slot S keeps crashing; respawning in D` → (S, D).
fn backoff_of(line: &str) -> Option<(u64, Duration)> {
    let (_, rest) = line.split_once("] slot ")?;
    let (slot, rest) = rest.split_once(" keeps crashing; respawning in ")?;
    let d = rest.trim();
    let delay = if let Some(ms) = d.strip_suffix("ms") {
        Duration::from_secs_f64(ms.parse::<f64>().ok()? / 1000.0)
    } else {
        Duration::from_secs_f64(d.strip_suffix('s')?.parse().ok()?)
    };
    Some((slot.parse().ok()?, delay))
}

#[test]
fn workers_dying_right_after_ready_are_respawned_with_backoff() {
    let (_dir, dir) = canonical_tempdir();
    let scratch = tempfile::tempdir().unwrap();
    let served = served_hello(&dir);
    let flag = scratch.path().join("crash-now");
    let host = Host::builder(&served)
        .dir(&dir)
        .arg("--watch")
        .env("CRASHLOOP_FLAG", &flag)
        .start();
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/include/angel.h");
    let src = format!(
        "#include \"{}\"\n{CRASH_AFTER_READY_C}",
        header
            .canonicalize()
            .expect("sdk/include/angel.h")
            .display()
    );
    let crashy = compile_c(scratch.path(), "crash-after-ready", &src);

    // It rolls in healthy (the flag is absent), so the crash loop starts from a committed
    // generation whatever the timing: committed once the old workers drained (they keep
    // serving through the settle that follows `reloaded`).
    let old = host.worker_pids();
    let mark = host.mark();
    land(&crashy, &served);
    let line = wait_reloaded(&host, mark);
    assert!(line.contains("(generation 2"), "{line}");
    host.wait_exited(&old, WAIT);

    // From now on every worker exits right after it reported ready.
    let mark = host.mark();
    let start = Instant::now();
    std::fs::write(&flag, "").unwrap();
    let window = Duration::from_secs(4);
    while start.elapsed() < window {
        if let Some(status) = host.try_status() {
            panic!(
                "the master exited ({status}) during the crash loop\n{}",
                host.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = host.log_since(mark);
    let forks = count_forks(&log);
    let deaths = log
        .lines()
        .filter(|l| l.starts_with("master[") && l.contains(" died ("))
        .count();
    let backoffs: Vec<(u64, Duration)> = log.lines().filter_map(backoff_of).collect();
    eprintln!("crash loop over {window:?}: {forks} forks, {deaths} deaths, backoffs {backoffs:?}");
    // Per slot: respawn at once, then after 100, 200, 400, 800, 1600 ms: 6 forks in 4 s.
    assert!(
        (4..=12).contains(&forks),
        "{forks} forks in {window:?} for 2 slots: expected a few with backoff, not a storm\n{log}"
    );
    assert!(deaths >= 4, "the workers did die: {deaths}\n{log}");
    for slot in 0..2 {
        let delays: Vec<Duration> = backoffs
            .iter()
            .filter(|(s, _)| *s == slot)
            .map(|(_, d)| *d)
            .collect();
        assert!(
            delays.windows(2).all(|w| w[0] <= w[1])
                && delays
                    .last()
                    .is_some_and(|d| *d >= Duration::from_millis(800)),
            "slot {slot} backs off with growing delays up to ≥ 800ms: {delays:?}\n{log}"
        );
    }
    let s = status(host.pidfile());
    assert_eq!(s.generation, 2, "no roll from crashes: {}", s.raw);

    // The master lives, and the next good build rolls.
    let mark = host.mark();
    land(&lib("hello"), &served);
    let line = wait_reloaded(&host, mark);
    assert!(line.contains("(generation 3"), "{line}");
    hello_pids(&host, 2);
    assert!(host.try_status().is_none(), "master alive");
}

/// A build that failed is not tried again when the same bytes land again (a touch, a rebuild
/// with identical output); an explicit `angel-host reload` does retry it; a new build rolls.
fn failed_build_is_not_retried_until_asked(bad: BadLib, word: &str) {
    let (_dir, dir) = canonical_tempdir();
    let scratch = tempfile::tempdir().unwrap();
    let served = served_hello(&dir);
    let host = Host::builder(&served).dir(&dir).arg("--watch").start();
    let old = live_pids(&host, 2);
    let load = Load::start(host.addr(), 0, 2);
    load.wait_more(&host, 10);
    let bad_src = bad.create(scratch.path());

    let mark = host.mark();
    land(&bad_src, &served);
    let line = wait_outcome(&host, mark).expect_err("a bad build must not roll");
    assert!(line.contains(&format!("] reload {word}: ")), "{line}");
    let sha = short_sha(&served);

    for how in ["touch", "rewrite"] {
        let mark = host.mark();
        match how {
            "touch" => std::fs::File::options()
                .write(true)
                .open(&served)
                .and_then(|f| f.set_modified(SystemTime::now()))
                .expect("touch"),
            _ => land(&bad_src, &served),
        }
        let still = host.wait_line_since(mark, WAIT, "`still the build that failed`", |l| {
            l.contains("still the build that failed")
        });
        assert!(
            still.contains(&served.display().to_string())
                && still.contains(&format!("(sha {sha})"))
                && still.contains("waiting for a new build or SIGHUP"),
            "{how}: {still}"
        );
        let log = host.log_since(mark);
        let before = &log[..log.find(&still).expect("line in log")];
        assert!(
            !before.lines().any(is_roll_activity),
            "{how}: the same failed bytes were tried again:\n{before}"
        );
    }

    // Asked explicitly, the host does retry it (and it fails again).
    let mark = host.mark();
    let out = ctl(host.pidfile(), &["reload"]);
    assert_eq!(out.status.code(), Some(5), "reload of a bad build: {out:?}");
    assert!(
        out.stderr.contains(&format!("reload {word}")),
        "reload says why: {}",
        out.stderr
    );
    let retry = host.wait_line_since(mark, WAIT, "the retried roll's outcome", is_roll_outcome);
    assert!(
        retry.contains(&format!("] reload {word}: ")) && retry.ends_with("keeping generation 1"),
        "{retry}"
    );
    if bad == BadLib::PanicInit {
        assert!(
            count_forks(&host.log_since(mark)) >= 1,
            "the retry started workers\n{}",
            host.log()
        );
    }
    assert_eq!(live_pids(&host, 2), old);

    // A new build rolls.
    let mark = host.mark();
    land(&lib("app"), &served);
    wait_reloaded(&host, mark);
    assert_body(&host, &old, APP_BODY);
    load.wait_more(&host, 10);
    load.finish().assert_clean(&host, 30);
}

#[test]
fn a_build_that_failed_to_start_is_not_retried_until_asked() {
    failed_build_is_not_retried_until_asked(BadLib::PanicInit, "failed");
}

#[test]
fn a_build_the_probe_rejected_is_not_retried_until_asked() {
    failed_build_is_not_retried_until_asked(BadLib::Text, "skipped");
}

/// Every worker reports ready, then exits 30 ms later: long enough for all of a generation to
/// be ready before the first exits, well inside the master's settle.
const EXIT_SOON_AFTER_READY_C: &str = r#"
#include <unistd.h>
ANGEL_EXPORT const uint32_t angel_abi_version = ANGEL_ABI_VERSION;
ANGEL_EXPORT int32_t angel_main(const angel_context *ctx) {
    ctx->host.notify(ctx->host.data, ANGEL_EVENT_READY, 0);
    usleep(30000);
    return ANGEL_EXIT_OK;
}
"#;

/// A build whose every worker reports ready and exits soon after must not replace a good
/// generation: the old workers serve on through the settle after `ready`, and the roll is
/// rolled back when a new worker dies within it.
#[test]
fn a_build_exiting_right_after_ready_is_rolled_back() {
    let (_dir, dir) = canonical_tempdir();
    let scratch = tempfile::tempdir().unwrap();
    let served = served_hello(&dir);
    let host = Host::builder(&served).dir(&dir).start();
    let old: BTreeSet<i32> = host.worker_pids().into_iter().collect();
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/include/angel.h");
    let src = format!(
        "#include \"{}\"\n{EXIT_SOON_AFTER_READY_C}",
        header
            .canonicalize()
            .expect("sdk/include/angel.h")
            .display()
    );
    let exits = compile_c(scratch.path(), "exits-after-ready", &src);
    land(&exits, &served);

    let mark = host.mark();
    host.hup();
    // All new workers were ready, so `reloaded` is logged; the roll must still end in a
    // roll-back that keeps generation 1.
    let failed = host.wait_line_since(mark, WAIT, "the roll-back", |l| {
        l.contains("] reload failed: ") && l.ends_with("; keeping generation 1")
    });
    assert!(
        failed.contains("right after its generation was ready"),
        "{failed}\n{}",
        host.log()
    );
    for i in 0..20 {
        let resp = get(host.addr(), "/")
            .unwrap_or_else(|e| panic!("GET #{i} after the roll-back: {e}\n{}", host.log()));
        let pid = hello_pid(&resp.text());
        assert!(
            old.contains(&pid),
            "answered by {pid}, not {old:?}\n{}",
            host.log()
        );
    }
    let ended: BTreeSet<i32> = ended_pids(&host.log()).into_iter().collect();
    assert!(
        ended.is_disjoint(&old),
        "an old worker ended:\n{}",
        host.log()
    );
}
