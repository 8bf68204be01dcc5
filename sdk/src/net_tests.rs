//! Unit tests of `net.rs`.

use super::*;

#[test]
fn listener_info_reports_each_address() {
    use std::os::fd::AsRawFd;
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Unique per process and test: no tempfile dependency in the SDK.
    let path = std::env::temp_dir().join(format!("angel-sdk-info-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let raw = [
        abi::Listener {
            fd: tcp.as_raw_fd(),
            kind: abi::LISTENER_TCP,
        },
        abi::Listener {
            fd: unix.as_raw_fd(),
            kind: abi::LISTENER_UNIX,
        },
    ];
    let infos: Vec<_> = raw
        .iter()
        .map(|l| ListenerInfo::from_abi(l).unwrap())
        .collect();
    assert_eq!(
        infos[0].local_addr(),
        &LocalAddr::Tcp(tcp.local_addr().unwrap())
    );
    assert!(infos[0].is_tcp() && !infos[1].is_tcp());
    assert_eq!(
        infos[1].local_addr().to_string(),
        format!("unix:{}", path.display())
    );
    let bad = abi::Listener {
        fd: tcp.as_raw_fd(),
        kind: 9,
    };
    assert!(ListenerInfo::from_abi(&bad).is_err());
    std::fs::remove_file(&path).unwrap();
}
