//! `Listeners::from_inherited`: socket activation's sockets as the master's listeners.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use socket2::Socket;

use super::tcp::new_tcp;
use super::*;

fn inherited(sock: Socket) -> crate::activation::Inherited {
    let fd = std::os::fd::OwnedFd::from(sock);
    let (addr, reuse_port) = crate::activation::validate(fd.as_fd()).expect("valid");
    crate::activation::Inherited {
        fd,
        name: None,
        addr,
        reuse_port,
    }
}

fn listening(reuseport: bool) -> Socket {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let sock = new_tcp(addr, reuseport).expect("socket");
    sock.bind(&addr.into()).expect("bind");
    sock.listen(BACKLOG).expect("listen");
    sock
}

#[test]
fn an_inherited_reuseport_socket_is_slot_0_of_a_group() {
    let first = listening(true);
    let raw = first.as_raw_fd();
    let mut l = Listeners::from_inherited(vec![inherited(first)], 3).expect("listeners");
    assert_eq!(l.tcp_slots(), 3);
    assert_eq!(
        l.for_slot(0)[0].0.as_raw_fd(),
        raw,
        "slot 0 is the inherited socket"
    );
    l.add_slot().expect("TTIN binds one more");
    assert_eq!(l.tcp_slots(), 4);
    let addr = l.tcp[0].addr;
    let _clients: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    let mut per_slot = Vec::new();
    for sock in &l.tcp[0].sockets {
        sock.set_nonblocking(true).expect("nonblocking");
        let mut n = 0;
        while sock.accept().is_ok() {
            n += 1;
        }
        per_slot.push(n);
    }
    assert_eq!(per_slot.iter().sum::<usize>(), 80, "{per_slot:?}");
    assert!(per_slot.iter().all(|&n| n > 3), "unbalanced: {per_slot:?}");
}

#[test]
fn an_inherited_socket_without_reuseport_is_shared_by_every_slot() {
    let sock = listening(false);
    let raw = sock.as_raw_fd();
    let mut l = Listeners::from_inherited(vec![inherited(sock)], 3).expect("listeners");
    assert_eq!(l.tcp_slots(), 1);
    l.add_slot().expect("TTIN is a no-op");
    assert_eq!(l.tcp_slots(), 1);
    for slot in 0..4 {
        assert_eq!(l.for_slot(slot)[0].0.as_raw_fd(), raw);
    }
}

#[test]
fn an_inherited_unix_socket_file_is_never_unlinked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("systemd.sock");
    let unix = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let fd = std::os::fd::OwnedFd::from(unix);
    let (addr, reuse_port) = crate::activation::validate(fd.as_fd()).expect("valid");
    let i = crate::activation::Inherited {
        fd,
        name: None,
        addr,
        reuse_port,
    };
    let mut l = Listeners::from_inherited(vec![i], 2).expect("listeners");
    assert_eq!(l.describe(), vec![format!("unix:{}", path.display())]);
    assert_eq!(l.for_slot(1)[0].1, Kind::Unix);
    l.cleanup();
    assert!(
        path.exists(),
        "systemd's socket file must outlive the master"
    );
}

#[test]
fn two_inherited_tcp_addresses_are_refused_by_name() {
    let (a, b) = (listening(false), listening(false));
    let names: Vec<String> = [&a, &b]
        .iter()
        .map(|s| {
            s.local_addr()
                .expect("addr")
                .as_socket()
                .expect("inet")
                .to_string()
        })
        .collect();
    let err = Listeners::from_inherited(vec![inherited(a), inherited(b)], 2)
        .expect_err("one TCP address only");
    assert_eq!(
        err.to_string(),
        format!(
            "LISTEN_FDS passes 2 TCP sockets ({}); angel-host serves one TCP address and one unix socket",
            names.join(", ")
        )
    );
}
