//! Unit tests of `accept.rs`.

use super::*;

fn emfile() -> io::Error {
    io::Error::from_raw_os_error(libc::EMFILE)
}

#[test]
fn accept_errors_log_the_first_then_a_count_per_interval() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut errors = AcceptErrors::default();
    let first = errors.on_error(at(0), &emfile()).unwrap();
    assert!(first.starts_with("failed: "), "{first}");
    assert!(first.contains("os error 24"), "{first}");
    // One retry per backoff for 30 s: 300 errors, a few lines.
    let mut lines = Vec::new();
    for i in 1..300 {
        lines.extend(errors.on_error(at(i * 100), &emfile()));
        if i % 50 == 0 {
            // Connections that got an fd in between do not end the burst.
            assert_eq!(errors.on_success(at(i * 100 + 1)), None);
        }
    }
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines[0].starts_with("failed 100 more times in the last 10s: "),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("os error 24"), "{}", lines[0]);
    assert!(
        lines[1].starts_with("failed 100 more times"),
        "{}",
        lines[1]
    );
    // The errors stop; the first accept a whole interval after the last report ends the
    // burst with its count.
    let end = errors.on_success(at(31_000)).unwrap();
    assert!(
        end.starts_with("failed 99 more times in the last 11s: "),
        "{end}"
    );
    assert!(end.ends_with("; accepting again"), "{end}");
    // A new burst is logged at once again.
    assert!(errors
        .on_error(at(40_000), &emfile())
        .unwrap()
        .starts_with("failed: "));
}

#[test]
fn a_single_accept_error_is_one_line() {
    let t0 = Instant::now();
    let mut errors = AcceptErrors::default();
    assert!(errors.on_error(t0, &emfile()).is_some());
    assert_eq!(errors.on_success(t0 + Duration::from_secs(60)), None);
    assert!(errors
        .on_error(t0 + Duration::from_secs(61), &emfile())
        .is_some());
}

/// A draining worker takes exactly what the kernel queued when its drain began: the length
/// of a listener's accept queue, read from `TCP_INFO`.
#[test]
fn the_accept_queue_length_is_read_from_the_kernel() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    assert_eq!(accept_queue_len(&l), Some(0));
    let addr = l.local_addr().expect("addr");
    let clients: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    assert_eq!(accept_queue_len(&l), Some(3));
    let _ = l.accept().expect("accept");
    assert_eq!(accept_queue_len(&l), Some(2));
    drop(clients);
}

/// Only a socket the master froze for a stop (a socket filter attached) counts as closing.
#[test]
fn only_a_socket_with_a_filter_counts_as_frozen() {
    use std::os::fd::AsRawFd;
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    assert!(!frozen(&l));
    let program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: u32::MAX,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points to `program`, alive for the call; the fd is ours.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    assert!(frozen(&l));
}
