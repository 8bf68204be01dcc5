//! Unit tests of `ctl.rs`.

use super::*;

#[test]
fn requests_parse_and_round_trip() {
    for r in [
        Request::Status,
        Request::Reload,
        Request::Stop,
        Request::StopFast,
        Request::Upgrade,
    ] {
        assert_eq!(Request::parse(&format!("{}\n", r.word())), Some(r));
    }
    assert_eq!(Request::parse("shutdown"), None);
}

#[test]
fn stale_and_missing_pidfiles_have_distinct_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("angel.pid");
    let missing = Client::connect(&path).err().expect("no pidfile");
    assert_eq!(missing.exit_code(), 3, "{missing}");
    std::fs::write(&path, "99999999\n").expect("write");
    let stale = Client::connect(&path).err().expect("stale");
    assert_eq!(stale.exit_code(), 1, "{stale}");
    assert!(stale.to_string().contains("stale pidfile"), "{stale}");
}

/// A master's status with nothing in it but its library and serving generation.
fn status_of(lib: PathBuf, generation: u64) -> Status {
    Status {
        pid: 1,
        uptime_secs: 0.0,
        generation,
        lib,
        library: None,
        sha256: None,
        listening: Vec::new(),
        rolling: false,
        settling: false,
        stopping: false,
        configured_workers: 1,
        workers: Vec::new(),
        binary: None,
        started_unix: None,
        helpers: Vec::new(),
    }
}

#[test]
fn status_with_a_non_utf8_library_path_serializes() {
    use std::os::unix::ffi::OsStrExt;
    let odd = PathBuf::from(std::ffi::OsStr::from_bytes(b"/srv/\xffapp/libapp.so"));
    let status = Status {
        library: Some(odd.clone()),
        ..status_of(odd, 1)
    };
    let line = serde_json::to_string(&status).expect("serializes");
    let back: Status = serde_json::from_str(&line).expect("parses");
    assert_eq!(back.lib, PathBuf::from("/srv/\u{fffd}app/libapp.so"));
    assert_eq!(back.library, Some(back.lib.clone()));
}

#[test]
fn a_serving_generation_whose_hash_is_still_computed_shows_it_as_pending() {
    let mut status = status_of(PathBuf::from("/srv/libapp.so"), 0);
    assert!(format_status(&status).contains("libapp.so (sha -)"));
    status.generation = 2;
    assert!(format_status(&status).contains("libapp.so (sha pending)"));
    status.sha256 = Some("9f8e7d6c5b4a39281706f5e4d3c2b1a0".to_owned());
    assert!(format_status(&status).contains("libapp.so (sha 9f8e7d6c5b4a3928)"));
}

#[test]
fn start_times_print_as_utc_dates() {
    assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(utc(1_796_125_425), "2026-12-01 11:43:45 UTC");
}

#[test]
fn status_formats_ages_for_humans() {
    assert_eq!(human_secs(3.25), "3.2s");
    assert_eq!(human_secs(125.0), "2m05s");
    assert_eq!(human_secs(7300.0), "2h01m");
    assert_eq!(human_secs(90_000.0), "1d01h");
}
