//! `--path`: serving on a unix socket.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use angel_tests::*;

#[test]
fn serves_http_on_a_unix_socket_and_a_second_instance_on_it_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("angel.sock");
    let host = Host::builder(lib("hello")).arg("--path").arg(&sock).start();
    assert_eq!(host.addr(), &Addr::Unix(sock.clone()), "{}", host.log());
    let resp = get(host.addr(), "/").unwrap();
    assert!(host.worker_pids().contains(&hello_pid(&resp.text())));

    let second = Host::builder(lib("hello"))
        .arg("--path")
        .arg(&sock)
        .run_to_exit(Duration::from_secs(20));
    assert_eq!(second.code(), 4, "stderr:\n{}", second.stderr);
    assert!(second.error_line().contains("in use"), "{}", second.stderr);

    // The first instance is unharmed: its socket file is still there and serves.
    for _ in 0..5 {
        let pid = hello_pid(&get(host.addr(), "/").unwrap().text());
        assert!(host.worker_pids().contains(&pid));
    }
    host.roll(WAIT);
    get(host.addr(), "/").unwrap();
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists(), "the stale socket file stays behind");
    let host = Host::builder(lib("hello")).arg("--path").arg(&sock).start();
    let resp = get(host.addr(), "/").unwrap();
    assert!(resp.text().starts_with("Hello:"));
}
