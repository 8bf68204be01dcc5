//! Raw TCP across rolls: `examples/echo`'s goodbye (`BYE`, then FIN) lets a client that
//! follows it lose nothing, and lets every drain end long before the graceful timeout.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use angel_tests::echo_client::EchoLoad;
use angel_tests::*;

const ROLLS: usize = 5;
const CONNECTIONS: usize = 4;
/// Far above what a drain with a goodbye takes (milliseconds; at most the SDK's 2 s
/// `GOODBYE_LINGER` for a client that never closes), so a drain that waits for its connections
/// to go away by themselves shows as a kill in the log.
const GRACEFUL_SECS: u64 = 20;
/// Each old generation must be gone within this of its replacement being ready.
const DRAIN_BOUND: Duration = Duration::from_secs(GRACEFUL_SECS / 2);
/// Lines answered between two rolls, so every roll happens under traffic.
const BETWEEN_ROLLS: u64 = 200;

#[test]
fn echo_clients_following_the_goodbye_lose_nothing_across_rolls_and_drains_end_early() {
    let graceful = format!("{GRACEFUL_SECS}s");
    let host = Host::start(
        lib("echo"),
        &["--workers", "2", "--graceful-timeout", &graceful],
    );
    let addr = host.addr().tcp();
    // An idle connection: its worker's drain must say goodbye to it at once.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"hello\n").unwrap();
    let mut hello = [0u8; 6];
    idle.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello\n");

    let load = EchoLoad::start(addr, CONNECTIONS);
    let wait_more = |than: u64| {
        wait_until(&host, WAIT, "echo lines to be answered", || {
            (load.ok() >= than + BETWEEN_ROLLS).then_some(())
        })
    };
    wait_more(0);
    for _ in 0..ROLLS {
        let old = host.worker_pids();
        let roll = host.roll(WAIT);
        let ready = Instant::now();
        host.wait_exited(&old, DRAIN_BOUND);
        assert!(
            ready.elapsed() < DRAIN_BOUND,
            "old workers {old:?} took {:?} to drain after `{}`\n{}",
            ready.elapsed(),
            roll.line,
            host.log()
        );
        wait_more(load.ok());
    }
    let report = load.finish();

    assert!(
        report.lost.is_empty(),
        "{} of {} lines lost:\n{}\n--- master stderr ---\n{}",
        report.lost.len(),
        report.ok + report.lost.len() as u64,
        report.lost.join("\n"),
        host.log()
    );
    idle.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"BYE\n", "the idle connection's goodbye");

    // Every drain met lines in flight: the goodbye refused them and the client resent them.
    assert!(
        report.retried > 0,
        "no goodbye was ever followed: {report:?}"
    );
    let log = host.log();
    assert!(
        !log.contains("still draining after --graceful-timeout"),
        "a drain needed a kill:\n{log}"
    );
}
