//! What a process under test leaves behind: its output, captured as it runs, and its exit.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Output captured continuously from a pipe by a background thread.
#[derive(Debug, Default)]
pub(crate) struct Captured {
    pub(crate) text: Mutex<String>,
    pub(crate) eof: AtomicBool,
}

impl Captured {
    pub(crate) fn spawn_reader(pipe: impl Read + Send + 'static) -> Arc<Captured> {
        let cap = Arc::new(Captured::default());
        let c = cap.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => c
                        .text
                        .lock()
                        .expect("capture lock")
                        .push_str(&String::from_utf8_lossy(&line)),
                }
            }
            c.eof.store(true, Ordering::SeqCst);
        });
        cap
    }

    pub(crate) fn get(&self) -> String {
        self.text.lock().expect("capture lock").clone()
    }
}

/// What a process run to completion left behind.
#[derive(Debug)]
pub struct Exit {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Exit {
    /// The exit code; panics (with stderr) if it was killed by a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| {
            panic!(
                "angel-host was killed by {:?}, stderr:\n{}",
                self.status.signal(),
                self.stderr
            )
        })
    }

    /// The first `error: ` line on stderr, lower-cased; panics if there is none.
    pub fn error_line(&self) -> String {
        self.stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no `error: ` line on stderr:\n{}", self.stderr))
            .to_lowercase()
    }
}
