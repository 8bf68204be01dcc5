//! The loss matrix cannot rot either: `loss-matrix` against the debug artifacts of the
//! workspace (built by `cargo build --workspace`), every traffic shape across two rolls. Each
//! shape's client must count something and lose nothing; the goodbye-following shapes must
//! have followed at least one goodbye between them.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The whole run (7 cells of ~1.5 s on a debug build) must end within this.
const MATRIX_TIMEOUT: Duration = Duration::from_secs(180);

/// `target/debug`, where `loss-matrix` finds the host and the example libraries.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf()
}

#[test]
fn loss_matrix_counts_every_traffic_shape_across_rolls_and_loses_nothing() {
    for name in [
        "angel-host",
        "libhello.so",
        "libecho.so",
        "libticker.so",
        "libaxum_example.so",
    ] {
        let path = target_dir().join(name);
        assert!(
            path.exists(),
            "{} is missing: run `cargo build --workspace` before `cargo test --workspace`",
            path.display()
        );
    }
    let child = Command::new(env!("CARGO_BIN_EXE_loss-matrix"))
        .args(["--only", "Rolls", "--rolls", "2", "--connections", "4"])
        .args(["--h2-connections", "2", "--h2-streams", "4"])
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
    let output = match rx.recv_timeout(MATRIX_TIMEOUT) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("loss-matrix did not finish within {MATRIX_TIMEOUT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loss-matrix failed\n{stdout}\n{stderr}"
    );
    // | traffic | event | sent | **lost** | refused | retried | time |
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(" rolls |"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(
        rows.len(),
        7,
        "one row per traffic shape:\n{stdout}\n{stderr}"
    );
    let mut retried = 0;
    for row in &rows {
        let number = |i: usize| -> u64 {
            row[i]
                .trim_matches('*')
                .parse()
                .unwrap_or_else(|_| panic!("column {i} of {row:?} is not a number"))
        };
        assert!(number(3) > 0, "nothing sent: {row:?}\n{stderr}");
        assert_eq!(number(4), 0, "lost: {row:?}\n{stderr}");
        retried += number(6);
    }
    assert!(retried > 0, "no goodbye followed in any shape:\n{stdout}");
}
