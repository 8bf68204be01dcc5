//! The quick run of the benchmark, so it cannot rot: `angel-bench --smoke` against the debug
//! artifacts of the workspace (built by `cargo build --workspace`), with the built-in client.
//! It must finish, report numbers, and lose no request across its rolls and recycles.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The whole smoke run (about 15 s on a debug build) must end within this.
const SMOKE_TIMEOUT: Duration = Duration::from_secs(180);

/// `target/debug`: the test executable lives in `target/debug/deps`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf()
}

fn artifact(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before `cargo test --workspace`",
        path.display()
    );
    path
}

#[test]
fn smoke_run_reports_numbers_and_loses_nothing_across_rolls() {
    let out = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_angel-bench"))
        .arg("--smoke")
        .arg("--out")
        .arg(out.path())
        .arg("--host-bin")
        .arg(artifact("angel-host"))
        .arg("--lib")
        .arg(artifact("libhello.so"))
        .arg("--plain-bin")
        .arg(env!("CARGO_BIN_EXE_plain-hyper"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(SMOKE_TIMEOUT) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("angel-bench --smoke did not finish within {SMOKE_TIMEOUT:?}");
        }
    };
    let log = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "angel-bench failed\n{log}");

    let summary = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
    let values: HashMap<&str, &str> = summary.lines().filter_map(|l| l.split_once('=')).collect();
    let number = |key: &str| -> f64 {
        values
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number for {key} in summary.txt:\n{summary}\n{log}"))
    };
    assert!(number("ab_angel_rps") > 0.0, "{summary}");
    assert!(number("ab_plain_rps") > 0.0, "{summary}");
    // Both references run, and the steady CPU ratios against them are reported (the figures
    // themselves are the full run's business: a debug build on a shared machine says little).
    // A ratio is 0 when no round had a usable CPU reading on both sides (seen once in a
    // 1-round smoke on a loaded machine); it must be there and a number.
    assert!(number("ab_minimal_rps") > 0.0, "{summary}");
    assert!(number("ab_cpu_ratio_minimal") >= 0.0, "{summary}");
    assert!(number("ab_cpu_ratio_plain") >= 0.0, "{summary}");
    assert!(number("worker_rss_kib") > 0.0, "{summary}");
    assert!(number("balance_ratio") >= 1.0, "{summary}");
    for mode in ["keepalive", "close"] {
        assert!(
            number(&format!("roll_{mode}_rolls")) >= 3.0,
            "{summary}\n{log}"
        );
        assert!(number(&format!("roll_{mode}_ok")) > 0.0, "{summary}");
        assert_eq!(
            number(&format!("roll_{mode}_failed")),
            0.0,
            "{summary}\n{log}"
        );
        assert!(
            number(&format!("recycle_{mode}_recycles")) >= 1.0,
            "{summary}"
        );
        assert_eq!(
            number(&format!("recycle_{mode}_failed")),
            0.0,
            "{summary}\n{log}"
        );
    }
    assert_eq!(number("idle_rolls"), 5.0, "{summary}");
    let svg = std::fs::read_to_string(out.path().join("rolls.svg")).unwrap();
    assert!(svg.contains("<svg"), "rolls.svg is not an SVG");
    let table = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(table.contains("| measure |"), "{table}");
}
