use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use super::*;

const CHILD_TEST: &str = "successor::tests::child_reads_the_handover";
const CHILD_OUT: &str = "ANGEL_TEST_SUCCESSOR_OUT";

#[test]
fn pid_digits_are_written_in_place() {
    let mut buf = [b'x'; PID_DIGITS + 1];
    // SAFETY: the buffer has PID_DIGITS + 1 bytes.
    unsafe { write_digits(buf.as_mut_ptr(), PID_DIGITS, 4_194_304) };
    assert_eq!(&buf[..8], b"4194304\0");
    // SAFETY: as above.
    unsafe { write_digits(buf.as_mut_ptr(), PID_DIGITS, 7) };
    assert_eq!(&buf[..2], b"7\0");
}

/// In the successor: what `activation::from_env` finds, written to the file in CHILD_OUT
/// (its stdout is the test runner's).
#[test]
#[ignore = "runs in the successor started by the handover test"]
fn child_reads_the_handover() {
    let Ok(out) = std::env::var(CHILD_OUT) else {
        return;
    };
    let mut lines = Vec::new();
    match crate::activation::from_env() {
        Ok(list) => {
            for i in list {
                lines.push(format!(
                    "fd={} name={} addr={}",
                    i.fd.as_raw_fd(),
                    i.name.as_deref().unwrap_or("-"),
                    i.addr.describe()
                ));
            }
        }
        Err(e) => lines.push(format!("error: {e}")),
    }
    lines.push(format!(
        "parent={}",
        std::env::var(PARENT_PID_VAR).unwrap_or_default()
    ));
    std::fs::write(out, lines.join("\n") + "\n").expect("write results");
}

#[test]
fn a_successor_takes_the_listeners_by_the_activation_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("child.txt");
    let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp");
    let path = dir.path().join("admin.sock");
    let unix = UnixListener::bind(&path).expect("unix");
    let args: Vec<OsString> = [
        "--exact",
        CHILD_TEST,
        "--ignored",
        "-q",
        "--test-threads",
        "1",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let pid = spawn_successor(
        &std::env::current_exe().expect("test exe"),
        &args,
        &[(tcp.as_fd(), "web"), (unix.as_fd(), "admin")],
        None,
        &[(CHILD_OUT, out.display().to_string())],
    )
    .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)).expect("waitpid") {
            WaitStatus::StillAlive => {}
            other => break other,
        }
        assert!(
            Instant::now() < deadline,
            "the successor did not exit in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, WaitStatus::Exited(pid, 0));
    let text = std::fs::read_to_string(&out).expect("the successor wrote its results");
    assert_eq!(
        text,
        format!(
            "fd=3 name=web addr={}\nfd=4 name=admin addr=unix:{}\nparent={}\n",
            tcp.local_addr().expect("addr"),
            path.display(),
            std::process::id()
        )
    );
}
