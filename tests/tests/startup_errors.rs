//! Bad input at start: every fault ends the master with its documented exit code and one
//! `error: ` line naming what and where, and leaves nothing behind.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use angel_tests::*;

/// Bound for a start-up failure (the slowest is the never-ready case, `--ready-timeout 1s`).
const EXIT_WAIT: Duration = Duration::from_secs(20);

const EXIT_USAGE: i32 = 2;
const EXIT_BAD_LIB: i32 = 3;
const EXIT_BIND: i32 = 4;
const EXIT_PIDFILE: i32 = 5;
const EXIT_NOT_READY: i32 = 6;

/// Starts (or `--check`s) on a bad library and returns the run plus the library path.
fn run_bad(
    bad: BadLib,
    check: bool,
    extra: &[&str],
) -> (Exit, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = bad.create(dir.path());
    let mut b = Host::builder(&path).dir(dir.path()).args(extra);
    if check {
        b = b.arg("--check");
    }
    (b.run_to_exit(EXIT_WAIT), path, dir)
}

/// Asserts a library fault: exit 3, an error line naming the path, no pidfile, no worker left.
/// Returns the error line with the library path cut out.
fn assert_bad_library(bad: BadLib, check: bool) -> String {
    let (exit, path, dir) = run_bad(bad, check, &[]);
    assert_eq!(
        exit.code(),
        EXIT_BAD_LIB,
        "{bad:?} check={check}, stderr:\n{}",
        exit.stderr
    );
    let line = exit.error_line();
    let shown = path.display().to_string().to_lowercase();
    assert!(line.contains(&shown), "error line names {shown}: {line}");
    assert!(
        !dir.path().join("angel.pid").exists(),
        "no pidfile left by a failed start"
    );
    assert!(!exit.stdout.contains("configuration ok"), "{}", exit.stdout);
    line.replace(&shown, "<lib>")
}

macro_rules! bad_library_tests {
    ($($start:ident, $check:ident: $bad:expr;)*) => {$(
        #[test]
        fn $start() {
            assert_bad_library($bad, false);
        }
        #[test]
        fn $check() {
            assert_bad_library($bad, true);
        }
    )*};
}

bad_library_tests! {
    missing_library_exits_3, check_missing_library_exits_3: BadLib::Missing;
    directory_as_library_exits_3, check_directory_as_library_exits_3: BadLib::Directory;
    text_file_as_library_exits_3, check_text_file_as_library_exits_3: BadLib::Text;
    zero_byte_library_exits_3, check_zero_byte_library_exits_3: BadLib::Empty;
    library_without_angel_symbols_exits_3, check_library_without_angel_symbols_exits_3: BadLib::NoSymbols;
}

fn assert_abi_mismatch_message(line: &str) {
    assert!(line.contains("abi"), "names the ABI: {line}");
    assert!(
        line.contains('1') && line.contains('2'),
        "names both versions, 1 and 2: {line}"
    );
}

#[test]
fn abi_mismatch_exits_3_naming_both_versions() {
    assert_abi_mismatch_message(&assert_bad_library(BadLib::AbiV2, false));
}

#[test]
fn check_abi_mismatch_exits_3_naming_both_versions() {
    assert_abi_mismatch_message(&assert_bad_library(BadLib::AbiV2, true));
}

fn assert_not_ready(bad: BadLib, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = bad.create(dir.path());
    let host = Host::builder(&path).dir(dir.path()).args(extra).spawn();
    let status = host.wait_exit(EXIT_WAIT);
    assert_eq!(
        status.code(),
        Some(EXIT_NOT_READY),
        "{bad:?}, stderr:\n{}",
        host.log()
    );
    assert!(
        host.log().lines().any(|l| l.starts_with("error: ")),
        "{}",
        host.log()
    );
    assert!(
        !host.pidfile().exists(),
        "no pidfile left by a failed start"
    );
    for pid in host.all_worker_pids_seen() {
        assert!(
            !pid_running(pid),
            "worker {pid} outlived its master\n{}",
            host.log()
        );
    }
}

#[test]
fn panic_in_init_exits_6() {
    assert_not_ready(BadLib::PanicInit, &[]);
}

#[test]
fn never_ready_exits_6_after_the_ready_timeout() {
    assert_not_ready(BadLib::NeverReady, &["--ready-timeout", "1s"]);
}

#[test]
fn segfault_before_ready_exits_6() {
    assert_not_ready(BadLib::Segfault, &[]);
}

#[test]
fn port_in_use_exits_4() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let exit = Host::builder(lib("hello"))
        .args(["--port", &port])
        .run_to_exit(EXIT_WAIT);
    assert_eq!(exit.code(), EXIT_BIND, "stderr:\n{}", exit.stderr);
    let line = exit.error_line();
    assert!(line.contains("in use") && line.contains(&port), "{line}");
}

#[test]
fn unix_socket_with_a_live_listener_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("live.sock");
    let _live = UnixListener::bind(&sock).unwrap();
    let exit = Host::builder(lib("hello"))
        .arg("--path")
        .arg(&sock)
        .run_to_exit(EXIT_WAIT);
    assert_eq!(exit.code(), EXIT_BIND, "stderr:\n{}", exit.stderr);
    let line = exit.error_line();
    assert!(line.contains("in use"), "{line}");
    assert!(
        line.contains(&sock.display().to_string().to_lowercase()),
        "{line}"
    );
    assert!(sock.exists(), "the live socket file was not removed");
}

#[test]
fn pidfile_naming_a_live_master_exits_5_and_the_first_keeps_serving() {
    let first = Host::start(lib("hello"), &[]);
    let pidfile = first.pidfile().to_path_buf();
    let exit = Host::builder(lib("hello"))
        .arg("--pidfile")
        .arg(&pidfile)
        .run_to_exit(EXIT_WAIT);
    assert_eq!(exit.code(), EXIT_PIDFILE, "stderr:\n{}", exit.stderr);
    let line = exit.error_line();
    assert!(
        line.contains("pid") && line.contains(&first.pid.to_string()),
        "{line}"
    );
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", first.pid),
        "the first master's pidfile is untouched"
    );
    let body = get(first.addr(), "/").unwrap().text();
    assert!(first.worker_pids().contains(&hello_pid(&body)));
}

#[test]
fn unwritable_pidfile_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("no/such/dir/angel.pid");
    let exit = Host::builder(lib("hello"))
        .arg("--pidfile")
        .arg(&pidfile)
        .run_to_exit(EXIT_WAIT);
    assert_eq!(exit.code(), EXIT_PIDFILE, "stderr:\n{}", exit.stderr);
    assert!(exit.error_line().contains("pid"), "{}", exit.stderr);
}

#[test]
fn zero_workers_is_a_usage_error() {
    let exit = Host::builder(lib("hello"))
        .args(["--workers", "0"])
        .run_to_exit(EXIT_WAIT);
    assert_eq!(exit.code(), EXIT_USAGE, "stderr:\n{}", exit.stderr);
    assert!(exit.error_line().contains("workers"), "{}", exit.stderr);
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let exit = Host::builder(lib("hello"))
        .arg("--no-such-flag")
        .run_to_exit(EXIT_WAIT);
    assert_eq!(exit.code(), EXIT_USAGE, "stderr:\n{}", exit.stderr);
    assert!(
        exit.error_line().contains("--no-such-flag"),
        "{}",
        exit.stderr
    );
}

#[test]
fn missing_lib_flag_is_a_usage_error() {
    let exit = run_to_exit(&[], EXIT_WAIT);
    assert_eq!(exit.code(), EXIT_USAGE, "stderr:\n{}", exit.stderr);
}

#[test]
fn check_accepts_a_good_library_and_binds_nothing() {
    // Hold the port: `--check` must succeed anyway because it binds nothing.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let exit = Host::builder(lib("hello"))
        .dir(dir.path())
        .args(["--check", "--port", &port])
        .run_to_exit(EXIT_WAIT);
    assert_eq!(exit.code(), 0, "stderr:\n{}", exit.stderr);
    assert!(
        exit.stdout.contains("configuration ok"),
        "stdout:\n{}",
        exit.stdout
    );
    assert!(
        !dir.path().join("angel.pid").exists(),
        "--check writes no pidfile"
    );
}

#[test]
fn check_accepts_the_app_template() {
    let exit = Host::builder(lib("app"))
        .arg("--check")
        .run_to_exit(EXIT_WAIT);
    assert_eq!(exit.code(), 0, "stderr:\n{}", exit.stderr);
    assert!(
        exit.stdout.contains("configuration ok"),
        "stdout:\n{}",
        exit.stdout
    );
}
