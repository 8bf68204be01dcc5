//! `Listeners::bind`: groups per TCP address, unix sockets, slots, steering.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::SockRef;

use super::*;

fn tcp(s: &str) -> ListenAddr {
    ListenAddr::Tcp(s.parse().expect("addr"))
}

fn accepted_per_slot(group: &TcpGroup) -> Vec<usize> {
    group
        .sockets
        .iter()
        .map(|sock| {
            sock.set_nonblocking(true).expect("nonblocking");
            std::iter::from_fn(|| sock.accept().ok()).count()
        })
        .collect()
}

fn port_of(sock: &Socket) -> u16 {
    sock.local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet")
        .port()
}

#[test]
fn ephemeral_port_group_shares_one_port() {
    let l = Listeners::bind(&[tcp("127.0.0.1:0")], 3).expect("bind");
    let group = &l.tcp[0];
    assert_eq!(group.sockets.len(), 3);
    assert_ne!(group.addr.port(), 0);
    for s in &group.sockets {
        assert_eq!(port_of(s), group.addr.port());
    }
}

#[test]
fn several_ephemeral_listeners_each_get_their_own_port() {
    let l = Listeners::bind(&[tcp("127.0.0.1:0"), tcp("127.0.0.1:0")], 2).expect("bind");
    assert_eq!(l.tcp.len(), 2);
    let (a, b) = (l.tcp[0].addr, l.tcp[1].addr);
    assert_ne!(a.port(), b.port());
    assert_eq!(l.describe(), vec![a.to_string(), b.to_string()]);
    // Slot 1 inherits socket 1 of each group.
    let fds: Vec<_> = l
        .for_slot(1)
        .iter()
        .map(|(fd, k)| (fd.as_raw_fd(), *k))
        .collect();
    assert_eq!(
        fds,
        vec![
            (l.tcp[0].sockets[1].as_raw_fd(), Kind::Tcp),
            (l.tcp[1].sockets[1].as_raw_fd(), Kind::Tcp)
        ]
    );
}

#[test]
fn busy_port_is_refused_even_for_reuseport_groups() {
    let first = Listeners::bind(&[tcp("127.0.0.1:0")], 2).expect("bind");
    let busy = first.tcp[0].addr;
    let err = Listeners::bind(&[tcp("127.0.0.1:0"), ListenAddr::Tcp(busy)], 2)
        .expect_err("second bind must fail");
    assert!(
        matches!(err, BindError::TcpInUse { addr } if addr == busy),
        "{err}"
    );
    assert!(err.to_string().contains(&busy.to_string()), "{err}");
}

#[test]
fn ipv6_only_lets_the_v4_and_v6_wildcards_share_a_port() {
    let v4 = Listeners::bind(&[tcp("0.0.0.0:0")], 1).expect("v4");
    let port = v4.tcp[0].addr.port();
    let v6: SocketAddr = format!("[::]:{port}").parse().expect("addr");
    match Listeners::bind(&[ListenAddr::Tcp(v6)], 1) {
        Ok(l) => assert!(l.tcp[0].sockets[0].only_v6().expect("v6only")),
        // No IPv6 on this machine: nothing to share.
        Err(BindError::Tcp { source, .. })
            if source.raw_os_error() == Some(libc::EAFNOSUPPORT)
                || source.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
        Err(e) => panic!("[::]:{port} beside 0.0.0.0:{port}: {e}"),
    }
}

#[test]
fn slots_are_added_steered_and_removed_in_every_group() {
    let mut l = Listeners::bind(&[tcp("127.0.0.1:0"), tcp("127.0.0.1:0")], 2).expect("bind");
    l.add_slot().expect("third slot");
    assert_eq!(l.tcp_slots(), 3);
    assert!(l.tcp.iter().all(|g| g.sockets.len() == 3));
    l.steer(2).expect("attach programs");
    for group in &l.tcp {
        let _clients: Vec<_> = (0..60)
            .map(|_| std::net::TcpStream::connect(group.addr).expect("connect"))
            .collect();
        let per_slot = accepted_per_slot(group);
        assert_eq!(per_slot.iter().sum::<usize>(), 60, "{per_slot:?}");
        assert_eq!(
            per_slot[2], 0,
            "retiring slot got connections: {per_slot:?}"
        );
        assert!(
            per_slot[0] > 5 && per_slot[1] > 5,
            "unbalanced: {per_slot:?}"
        );
    }
    l.remove_last_slot();
    assert!(l.tcp.iter().all(|g| g.sockets.len() == 2));
    l.close();
    assert_eq!(l.tcp_slots(), 0);
}

#[test]
fn stale_unix_socket_is_replaced_live_one_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
    let unix = [ListenAddr::Unix(path.clone())];
    let mut live = Listeners::bind(&unix, 1).expect("stale socket replaced");
    let err = Listeners::bind(&unix, 1).expect_err("live socket refused");
    assert!(matches!(err, BindError::UnixInUse { .. }), "{err}");
    live.cleanup();
    assert!(!path.exists());
}

#[test]
fn a_failed_bind_removes_the_unix_sockets_it_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let busy = Listeners::bind(&[tcp("127.0.0.1:0")], 1).expect("bind");
    let err = Listeners::bind(
        &[
            ListenAddr::Unix(a.clone()),
            ListenAddr::Unix(b.clone()),
            ListenAddr::Tcp(busy.tcp[0].addr),
        ],
        1,
    )
    .expect_err("busy");
    assert!(matches!(err, BindError::TcpInUse { .. }), "{err}");
    assert!(!a.exists() && !b.exists());
}

/// What a stop relies on: after `freeze`, what was queued is still there to accept, and a new
/// client's handshake does not complete (its SYN is dropped) — until the socket closes, when
/// its SYN retry is refused rather than reset.
#[test]
fn a_frozen_socket_keeps_its_queue_and_takes_no_new_handshake() {
    let l = Listeners::bind(&[tcp("127.0.0.1:0")], 1).expect("bind");
    let group = &l.tcp[0];
    let addr = group.addr;
    let queued = std::net::TcpStream::connect(addr).expect("connect before the freeze");
    group.freeze().expect("freeze");
    let late = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    late.set_nonblocking(true).expect("nonblocking");
    let _ = late.connect(&addr.into());
    let mut fds = [libc::pollfd {
        fd: late.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    }];
    // SAFETY: one valid pollfd for the call's duration.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 300) };
    assert_eq!(ready, 0, "a handshake completed on a frozen socket");
    group.sockets[0].set_nonblocking(true).expect("nonblocking");
    let (accepted, _) = group.sockets[0].accept().expect("the queued connection");
    assert_eq!(
        accepted.peer_addr().expect("peer").as_socket(),
        queued.local_addr().ok()
    );
    assert!(group.sockets[0].accept().is_err(), "only one was queued");
}

/// What an upgrade hands over comes back as the same groups, slots and unix sockets, and the
/// new master removes a unix socket file the old one bound only once it is in charge.
#[test]
fn handed_over_listeners_keep_their_groups_slots_and_unix_ownership() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("app.sock");
    let old = Listeners::bind(
        &[
            tcp("127.0.0.1:0"),
            tcp("127.0.0.1:0"),
            ListenAddr::Unix(sock.clone()),
        ],
        2,
    )
    .expect("bind");
    let inherited: Vec<crate::activation::Inherited> = old
        .handover()
        .into_iter()
        .map(|(fd, name)| {
            let fd = fd.try_clone_to_owned().expect("dup");
            let addr = match SockRef::from(&fd).local_addr().expect("addr").as_socket() {
                Some(a) => crate::activation::Addr::Tcp(a),
                None => crate::activation::Addr::Unix(sock.clone()),
            };
            crate::activation::Inherited {
                fd,
                name: Some(name),
                addr,
                reuse_port: true,
            }
        })
        .collect();
    let names: Vec<String> = inherited.iter().filter_map(|i| i.name.clone()).collect();
    assert_eq!(
        names,
        [
            "angel.tcp.0.0",
            "angel.tcp.0.1",
            "angel.tcp.1.0",
            "angel.tcp.1.1",
            "angel.unix.0.o"
        ]
    );
    let (mut new, owned) = Listeners::from_handover(inherited).expect("handover");
    assert!(owned);
    assert_eq!(new.describe(), old.describe());
    assert_eq!(new.tcp_slots(), 2);
    // Not in charge yet: a new master that fails leaves the file to the old one.
    new.cleanup();
    assert!(sock.exists());
    let (mut new, _) = {
        let again: Vec<crate::activation::Inherited> = old
            .handover()
            .into_iter()
            .map(|(fd, name)| crate::activation::Inherited {
                addr: match SockRef::from(&fd).local_addr().expect("addr").as_socket() {
                    Some(a) => crate::activation::Addr::Tcp(a),
                    None => crate::activation::Addr::Unix(sock.clone()),
                },
                fd: fd.try_clone_to_owned().expect("dup"),
                name: Some(name),
                reuse_port: true,
            })
            .collect();
        Listeners::from_handover(again).expect("handover")
    };
    new.take_charge(true);
    new.close();
    assert!(!sock.exists(), "in charge, the new master removes the file");
}

#[test]
fn a_foreign_fd_name_is_not_a_handover() {
    let l = Listeners::bind(&[tcp("127.0.0.1:0")], 1).expect("bind");
    let (fd, _) = l.handover().remove(0);
    let addr = SockRef::from(&fd)
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let inherited = vec![crate::activation::Inherited {
        fd: fd.try_clone_to_owned().expect("dup"),
        name: Some("web".into()),
        addr: crate::activation::Addr::Tcp(addr),
        reuse_port: true,
    }];
    let err = Listeners::from_handover(inherited).expect_err("refused");
    assert!(
        err.to_string()
            .contains("not one of angel-host's listeners"),
        "{err}"
    );
}

#[test]
fn a_changed_listen_address_is_named_against_the_listeners_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("app.sock");
    let have =
        Listeners::bind(&[tcp("127.0.0.1:0"), ListenAddr::Unix(sock.clone())], 1).expect("bind");
    let port = port_of(&have.tcp[0].sockets[0]);
    let none = (Vec::<String>::new(), Vec::<String>::new());
    // The same settings: a port 0 asked for is the port it got.
    let unix = ListenAddr::Unix(sock.clone());
    assert_eq!(
        have.differences(&[tcp("127.0.0.1:0"), unix.clone()], true),
        none
    );
    let same = tcp(&format!("127.0.0.1:{port}"));
    assert_eq!(have.differences(&[same, unix.clone()], true), none);
    // Another port, and the unix socket dropped.
    let (missing, unwanted) = have.differences(&[tcp("127.0.0.1:1")], true);
    assert_eq!(missing, ["127.0.0.1:1"]);
    assert_eq!(
        unwanted,
        [
            format!("127.0.0.1:{port}"),
            format!("unix:{}", sock.display())
        ]
    );
    // Unix sockets the old master did not bind came from the service manager: its choice.
    assert_eq!(have.differences(&[tcp("127.0.0.1:1")], false), none);
}
