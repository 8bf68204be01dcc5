use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use super::*;

/// The ignored test that the child-process tests run in the child.
const CHILD_TEST: &str = "activation::tests::child_reports_from_env";
const CHILD_FLAG: &str = "ANGEL_TEST_ACTIVATION_CHILD";

#[test]
fn env_is_ours_only_with_our_pid() {
    let env = parse_env(Some("2"), Some("42"), Some("web:admin"), 42).expect("parse");
    assert_eq!(
        env,
        Some(Env {
            count: 2,
            names: vec![Some("web".into()), Some("admin".into())]
        })
    );
    assert_eq!(
        parse_env(Some("2"), Some("41"), None, 42).expect("other"),
        None
    );
    assert_eq!(parse_env(Some("2"), None, None, 42).expect("no pid"), None);
    assert_eq!(parse_env(None, Some("42"), None, 42).expect("unset"), None);
    assert_eq!(
        parse_env(Some("0"), Some("42"), None, 42).expect("zero"),
        None
    );
    let short = parse_env(Some("3"), Some("42"), Some("web"), 42).expect("few names");
    assert_eq!(
        short.map(|e| e.names),
        Some(vec![Some("web".into()), None, None])
    );
    assert!(matches!(
        parse_env(Some("two"), Some("42"), None, 42),
        Err(ActivationError::BadCount(_))
    ));
    assert!(matches!(
        parse_env(Some("1"), Some("me"), None, 42),
        Err(ActivationError::BadPid(_))
    ));
}

#[test]
fn listening_tcp_and_unix_sockets_validate() {
    let v4 = TcpListener::bind("127.0.0.1:0").expect("v4");
    let (addr, reuse) = validate(v4.as_fd()).expect("v4 valid");
    assert_eq!(addr, Addr::Tcp(v4.local_addr().expect("addr")));
    assert!(!reuse);

    let v6 = Socket::new(Domain::IPV6, Type::STREAM, None).expect("v6");
    v6.set_reuse_port(true).expect("reuseport");
    v6.bind(&"[::1]:0".parse::<SocketAddr>().expect("v6 addr").into())
        .expect("bind v6");
    v6.listen(8).expect("listen");
    let (addr, reuse) = validate(v6.as_fd()).expect("v6 valid");
    assert!(matches!(addr, Addr::Tcp(SocketAddr::V6(_))), "{addr:?}");
    assert!(reuse, "SO_REUSEPORT is reported");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.sock");
    let unix = UnixListener::bind(&path).expect("unix");
    let (addr, _) = validate(unix.as_fd()).expect("unix valid");
    assert_eq!(addr, Addr::Unix(path.clone()));
    assert_eq!(addr.describe(), format!("unix:{}", path.display()));
}

#[test]
fn a_udp_socket_is_refused_as_datagram() {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let err = validate(udp.as_fd()).expect_err("udp refused");
    let fd = udp.as_raw_fd();
    assert!(
        matches!(err, ActivationError::NotStream { fd: f, .. } if f == fd),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&format!("inherited fd {fd}")), "{text}");
    assert!(text.contains("datagram (SOCK_DGRAM)"), "{text}");
}

#[test]
fn a_tcp_socket_that_does_not_listen_is_refused() {
    let bound = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    bound
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    let err = validate(bound.as_fd()).expect_err("bound, not listening");
    assert!(
        matches!(err, ActivationError::NotListening { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not listening"), "{err}");

    let server = TcpListener::bind("127.0.0.1:0").expect("server");
    let client = TcpStream::connect(server.local_addr().expect("addr")).expect("connect");
    let err = validate(client.as_fd()).expect_err("connected stream");
    assert!(
        matches!(err, ActivationError::NotListening { .. }),
        "{err:?}"
    );
}

#[test]
fn a_regular_file_and_a_pipe_are_refused() {
    let file = tempfile::tempfile().expect("file");
    let err = validate(file.as_fd()).expect_err("file refused");
    assert!(
        err.to_string().ends_with("not a socket but a regular file"),
        "{err}"
    );
    let (r, _w) = nix::unistd::pipe().expect("pipe");
    let err = validate(r.as_fd()).expect_err("pipe refused");
    assert!(
        err.to_string().ends_with("not a socket but a pipe"),
        "{err}"
    );
}

fn inherited(sock: Socket) -> Inherited {
    let fd = OwnedFd::from(sock);
    let (addr, reuse_port) = validate(fd.as_fd()).expect("valid");
    Inherited {
        fd,
        name: None,
        addr,
        reuse_port,
    }
}

#[test]
fn per_slot_sockets_join_an_inherited_reuseport_group_and_share_its_connections() {
    let first = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    first.set_reuse_port(true).expect("reuseport");
    first
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    first.listen(128).expect("listen");
    let slot0 = inherited(first);
    let Addr::Tcp(addr) = slot0.addr else {
        panic!("tcp expected");
    };
    let extra = join_reuseport_group(&slot0, 3, 128).expect("join");
    let _clients: Vec<_> = (0..80)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let mut per_slot = Vec::new();
    let slot0 = Socket::from(slot0.fd);
    for sock in std::iter::once(&slot0).chain(&extra) {
        sock.set_nonblocking(true).expect("nonblocking");
        let mut n = 0;
        while sock.accept().is_ok() {
            n += 1;
        }
        per_slot.push(n);
    }
    assert_eq!(per_slot.iter().sum::<usize>(), 80, "{per_slot:?}");
    assert!(per_slot.iter().all(|&n| n > 5), "unbalanced: {per_slot:?}");
}

#[test]
fn joining_needs_reuseport_on_the_inherited_socket() {
    let plain = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    plain
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    plain.listen(8).expect("listen");
    let err = join_reuseport_group(&inherited(plain), 1, 8).expect_err("no reuseport");
    assert!(matches!(err, JoinError::NoReusePort(_)), "{err}");
    assert!(err.to_string().contains("ReusePort=yes"), "{err}");
}

#[test]
fn an_fd_that_is_not_open_is_refused_before_it_is_owned() {
    // Far above any open fd (and any RLIMIT_NOFILE here): never open.
    let err = take_fd(999_999).expect_err("not open");
    assert_eq!(
        err.to_string(),
        "inherited fd 999999 (LISTEN_FDS): cannot use it (is it open?): Bad file descriptor (os error 9)"
    );
}

/// In a child: a root-created reuseport socket (as systemd makes it), then a drop to
/// `nobody`, then the join.
#[test]
#[ignore = "runs in a child process of joining_needs_the_uid_that_created_the_socket"]
fn child_joins_after_dropping_root() {
    if std::env::var_os(CHILD_FLAG).is_none() {
        return;
    }
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.set_reuse_port(true).expect("reuseport");
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
        .expect("bind");
    sock.listen(8).expect("listen");
    let slot0 = inherited(sock);
    let creds = crate::privdrop::resolve("nobody", None).expect("nobody");
    crate::privdrop::drop_privileges(&creds).expect("drop");
    println!();
    match join_reuseport_group(&slot0, 1, 8) {
        Ok(_) => println!("CHILD joined"),
        Err(JoinError::Bind { source, .. }) => println!("CHILD refused: {:?}", source.kind()),
        Err(e) => println!("CHILD other error: {e}"),
    }
}

#[test]
fn joining_needs_the_uid_that_created_the_socket() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to create the socket as another uid");
        return;
    }
    let mut cmd = Command::new(std::env::current_exe().expect("test exe"));
    cmd.args([
        "--exact",
        "activation::tests::child_joins_after_dropping_root",
        "--ignored",
        "--nocapture",
    ])
    .args(["--test-threads", "1"])
    .env(CHILD_FLAG, "1");
    assert_eq!(child_lines(cmd), vec!["refused: AddrInUse".to_string()]);
}

/// Runs in the child: prints what `from_env` found, one line per fd, then the environment
/// after `unset_env`.
#[test]
#[ignore = "runs in a child process of the tests below"]
fn child_reports_from_env() {
    if std::env::var_os(CHILD_FLAG).is_none() {
        return;
    }
    // libtest has printed `test NAME ... ` without a newline: start our lines afresh.
    println!();
    println!(
        "child pid={} LISTEN_FDS={:?} LISTEN_PID={:?}",
        std::process::id(),
        std::env::var("LISTEN_FDS"),
        std::env::var("LISTEN_PID")
    );
    match from_env() {
        Ok(list) => {
            for i in list {
                println!(
                    "CHILD fd={} name={} addr={} reuseport={}",
                    i.fd.as_raw_fd(),
                    i.name.as_deref().unwrap_or("-"),
                    i.addr.describe(),
                    i.reuse_port
                );
            }
        }
        Err(e) => println!("CHILD error: {e}"),
    }
    unset_env();
    println!(
        "CHILD after unset_env LISTEN_FDS={:?}",
        std::env::var_os("LISTEN_FDS")
    );
}

/// Child stdout lines starting with `CHILD `, after the child exited (bounded wait).
fn child_lines(mut cmd: Command) -> Vec<String> {
    let child = cmd
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
        "child failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("CHILD "))
        .map(str::to_string)
        .collect()
}

/// `sh` sets `LISTEN_PID` to its own pid and execs the test binary, which keeps that pid.
fn child_with_fds(fds: &[BorrowedFd<'_>], names: &str) -> Command {
    // Copies at 100 and up, so that placing them at 3, 4, ... never overwrites a source.
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| fd.try_clone_to_owned().expect("dup"))
        .map(|fd| {
            let raw = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(100)).expect("dupfd");
            // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw) }
        })
        .collect();
    let raws: Vec<RawFd> = high.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
        .arg(std::env::current_exe().expect("test exe"))
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_FLAG, "1")
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names)
        .env_remove("LISTEN_PID");
    // SAFETY: between fork and exec the closure only calls dup2, which is async-signal-safe,
    // on fds (`raws`) that stay open in the parent until the child has exec'd (`high` moves
    // into the closure, which lives as long as the Command).
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &high;
            for (i, &fd) in raws.iter().enumerate() {
                if libc::dup2(fd, LISTEN_FDS_START + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn from_env_takes_fds_3_and_up_and_unsets_the_variables() {
    let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("b.sock");
    let unix = UnixListener::bind(&path).expect("unix");
    let lines = child_lines(child_with_fds(&[tcp.as_fd(), unix.as_fd()], "web:admin"));
    assert_eq!(
        lines,
        vec![
            format!(
                "fd=3 name=web addr={} reuseport=false",
                tcp.local_addr().expect("addr")
            ),
            format!(
                "fd=4 name=admin addr=unix:{} reuseport=false",
                path.display()
            ),
            "after unset_env LISTEN_FDS=None".to_string(),
        ]
    );
}

#[test]
fn from_env_names_the_bad_fd() {
    let tcp = TcpListener::bind("127.0.0.1:0").expect("tcp");
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let lines = child_lines(child_with_fds(&[tcp.as_fd(), udp.as_fd()], ""));
    assert_eq!(
        lines[0],
        "error: inherited fd 4 (LISTEN_FDS): a datagram (SOCK_DGRAM) socket, not a stream \
         socket; angel-host serves TCP and unix stream sockets (ListenStream=)"
    );
}

/// The real thing: `systemd-socket-activate -l ADDR` binds, waits for a first connection,
/// then execs the program with `LISTEN_FDS=1`, `LISTEN_PID`, `LISTEN_FDNAMES`.
#[test]
fn systemd_socket_activate_fds_pass_validation() {
    const TOOL: &str = "/usr/bin/systemd-socket-activate";
    if !std::path::Path::new(TOOL).exists() {
        eprintln!("skipped: {TOOL} is not installed (Debian package systemd)");
        return;
    }
    // A free port: the tool refuses port 0.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new(TOOL)
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--fdname=web")
        .arg(format!("--setenv={CHILD_FLAG}=1"))
        .arg(std::env::current_exe().expect("test exe"))
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let stderr = child.stderr.take().expect("stderr");
    let mut stderr = BufReader::new(stderr).lines();
    // "Listening on 127.0.0.1:PORT as 3." comes before it waits for a connection.
    let listening = stderr
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("Listening on"));
    assert!(
        listening.is_some(),
        "systemd-socket-activate did not listen"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect triggers the exec");
    let out = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the activated child did not exit in 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut stdout)
        .expect("read stdout");
    assert!(out.success(), "{out:?}\n{stdout}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("CHILD "))
        .collect();
    assert_eq!(
        lines,
        vec![
            format!("fd=3 name=web addr=127.0.0.1:{port} reuseport=false").as_str(),
            "after unset_env LISTEN_FDS=None",
        ],
        "child stdout:\n{stdout}"
    );
}
