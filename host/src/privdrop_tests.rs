use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;

const CHILD_TEST: &str = "privdrop::tests::child_drops_to_the_given_user";
const CHILD_ARG: &str = "ANGEL_TEST_PRIVDROP_CREDENTIALS";
const CHILD_SNAPSHOT: &str = "ANGEL_TEST_PRIVDROP_SNAPSHOT";

#[test]
fn root_and_nobody_resolve_by_name_and_number() {
    let root = resolve("root", None).expect("root");
    assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
    assert!(root.groups.contains(&Gid::from_raw(0)), "{root:?}");
    assert_eq!(resolve("0", None).expect("uid 0").user, "root");

    let nobody = User::from_name("nobody")
        .expect("lookup")
        .expect("this system has a nobody user");
    let creds = resolve("nobody", None).expect("nobody");
    assert_eq!(creds.uid, nobody.uid);
    assert_eq!(creds.gid, nobody.gid);
    assert!(creds.groups.contains(&nobody.gid), "{creds:?}");

    let with_group = resolve("nobody", Some("0")).expect("numeric group");
    assert_eq!(with_group.gid, Gid::from_raw(0));
    assert_eq!(with_group.groups, vec![Gid::from_raw(0)], "only --group");
}

#[test]
fn missing_names_are_clear_errors() {
    let err = resolve("angel-no-such-user", None).expect_err("missing user");
    assert_eq!(err.to_string(), "--user angel-no-such-user: no such user");
    let err = resolve("nobody", Some("angel-no-such-group")).expect_err("missing group");
    assert_eq!(
        err.to_string(),
        "--group angel-no-such-group: no such group"
    );
}

#[test]
fn a_bare_uid_needs_a_group() {
    let err = resolve("54321", None).expect_err("no passwd entry");
    assert!(matches!(err, PrivError::NeedsGroup(_)), "{err}");
    let creds = resolve("54321", Some("54321")).expect("uid and gid");
    assert_eq!(creds.uid.as_raw(), 54321);
    assert_eq!(creds.groups, vec![Gid::from_raw(54321)]);
}

#[test]
fn credentials_round_trip_through_one_argv_word() {
    let creds = Credentials {
        user: "app:odd".into(),
        uid: Uid::from_raw(1000),
        gid: Gid::from_raw(1001),
        groups: vec![Gid::from_raw(1001), Gid::from_raw(27)],
    };
    assert_eq!(creds.to_arg(), "1000:1001:1001,27:app:odd");
    assert_eq!(
        Credentials::parse_arg(&creds.to_arg()).expect("parse"),
        creds
    );
    assert!(matches!(
        Credentials::parse_arg("x:1::n"),
        Err(PrivError::BadArg(_))
    ));
}

/// In the child: drop to the credentials in `CHILD_ARG`, then print what the kernel says.
#[test]
#[ignore = "runs in a child process of drops_to_nobody_in_a_child_process"]
fn child_drops_to_the_given_user() {
    let Ok(arg) = std::env::var(CHILD_ARG) else {
        return;
    };
    // libtest has printed `test NAME ... ` without a newline: start our lines afresh.
    println!();
    let creds = Credentials::parse_arg(&arg).expect("credentials");
    // The snapshot, as a worker would inherit it: opened while still root.
    let snapshot = std::env::var(CHILD_SNAPSHOT).expect("snapshot path");
    let held = std::fs::File::open(&snapshot).expect("open as root");
    drop_privileges(&creds).expect("drop");
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    for line in status.lines() {
        if ["Uid:", "Gid:", "Groups:"]
            .iter()
            .any(|k| line.starts_with(k))
        {
            println!("CHILD {line}");
        }
    }
    println!(
        "CHILD setuid(0): {}",
        nix::unistd::setuid(Uid::from_raw(0)).map_or_else(|e| e.to_string(), |_| "ok".into())
    );
    let again = drop_privileges(&creds).expect_err("not root any more");
    println!("CHILD again: {again}");
    let by_path = std::fs::File::open(&snapshot)
        .map(|_| ())
        .map_err(|e| e.kind());
    println!("CHILD snapshot by path: {by_path:?}");
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held));
    let by_fd = std::fs::read(&proc_path)
        .map(|b| b.len())
        .map_err(|e| e.kind());
    println!("CHILD snapshot by /proc/self/fd: {by_fd:?}");
}

#[test]
fn drops_to_nobody_in_a_child_process() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: dropping privileges needs root");
        return;
    }
    let creds = resolve("nobody", None).expect("nobody");
    // A snapshot directory as the master makes it: 0700, owned by root; the file readable.
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = dir.path().join("gen1-abc.so");
    std::fs::write(&snapshot, b"0123456789").expect("write");
    std::fs::set_permissions(&snapshot, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let child = Command::new(std::env::current_exe().expect("test exe"))
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ARG, creds.to_arg())
        .env(CHILD_SNAPSHOT, &snapshot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the child exits within 30 s")
        .expect("child output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("CHILD "))
        .collect();
    let (u, g) = (creds.uid.as_raw(), creds.gid.as_raw());
    let mut groups: Vec<u32> = creds.groups.iter().map(|g| g.as_raw()).collect();
    groups.sort_unstable();
    // The kernel prints the sorted list, each group followed by a space.
    let groups: String = groups.iter().map(|g| format!("{g} ")).collect();
    assert_eq!(
        lines,
        vec![
            format!("Uid:\t{u}\t{u}\t{u}\t{u}"),
            format!("Gid:\t{g}\t{g}\t{g}\t{g}"),
            format!("Groups:\t{groups}"),
            "setuid(0): EPERM: Operation not permitted".to_string(),
            format!(
                "again: cannot switch to user nobody: running as uid {u}, not root (run the \
                 master as root, or drop --user)"
            ),
            // The 0700 directory locks the worker out by path, but the fd it inherited
            // still reads: hand each worker its generation's snapshot as an fd.
            "snapshot by path: Err(PermissionDenied)".to_string(),
            "snapshot by /proc/self/fd: Ok(10)".to_string(),
        ],
        "child stdout:\n{stdout}"
    );
}
