//! What real operators' machines hold: library paths that are not UTF-8, pidfiles full of
//! garbage, and other programs that call themselves `angel-host`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use angel_tests::ops::*;
use angel_tests::*;

#[test]
fn status_works_when_the_library_path_is_not_utf8() {
    let work = tempfile::tempdir().expect("tempdir");
    let odd = work.path().join(OsStr::from_bytes(b"rel\xffease"));
    std::fs::create_dir(&odd).expect("mkdir");
    let lib_path = odd.join("libhello.so");
    std::fs::copy(lib("hello"), &lib_path).expect("copy the library");
    let host = Host::builder(&lib_path).dir(work.path()).start();

    let plain = ctl(host.pidfile(), &["status"]);
    assert_eq!(
        plain.status.code(),
        Some(0),
        "status failed\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- master ---\n{}",
        plain.stdout,
        plain.stderr,
        host.log()
    );
    assert!(plain.stdout.contains("rel\u{fffd}ease"), "{}", plain.stdout);
    let status = status_value(host.pidfile());
    let shown = lib_path.to_string_lossy();
    assert_eq!(status["lib"], shown.as_ref(), "{status}");
    assert_eq!(status["generation"], 1, "{status}");
}

#[test]
fn pidfile_with_invalid_utf8_is_treated_as_stale() {
    let work = tempfile::tempdir().expect("tempdir");
    std::fs::write(work.path().join("angel.pid"), b"\xff\xfe4242\n").expect("write");
    let host = Host::builder(lib("hello")).dir(work.path()).start();
    assert!(
        host.log().contains("replacing stale pid_file"),
        "{}",
        host.log()
    );
    get(host.addr(), "/").expect("serves");
}

#[test]
fn a_process_started_as_angel_host_is_not_taken_for_a_master() {
    let work = tempfile::tempdir().expect("tempdir");
    // `exec -a angel-host sleep`: argv[0] says angel-host, the binary and the absent control
    // socket say otherwise.
    let mut impostor = Command::new("sleep")
        .arg0("angel-host")
        .arg("60")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let cmdline = format!("/proc/{}/cmdline", impostor.id());
    poll(
        WAIT,
        "the impostor to have exec'd",
        || format!("{:?}", std::fs::read(&cmdline)),
        || {
            std::fs::read(&cmdline)
                .ok()
                .filter(|argv| argv.starts_with(b"angel-host\0"))
        },
    );
    std::fs::write(
        work.path().join("angel.pid"),
        format!("{}\n", impostor.id()),
    )
    .expect("write");

    let host = Host::builder(lib("hello")).dir(work.path()).spawn();
    let started = wait_until(&host, START_TIMEOUT, "serving or an exit", || {
        let log = host.log();
        if log.contains("(generation 1") {
            Some(true)
        } else {
            host.try_status().map(|_| false)
        }
    });
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert!(started, "start refused:\n{}", host.log());
    assert!(
        host.log().contains(&format!(
            "replacing stale pid_file: {}",
            work.path().join("angel.pid").display()
        )),
        "{}",
        host.log()
    );
}
