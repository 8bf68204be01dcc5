//! An echo load that follows `examples/echo`'s goodbye, as an honest client of that protocol.
//!
//! Each connection sends a numbered line, waits for its answer, and goes on flat out. An
//! answer `BYE` is the server's goodbye: the line just sent was refused unprocessed, so it is
//! sent again on a new connection (counted as retried). Everything else that does not come
//! back as sent — EOF, a reset, a wrong line, no answer within [`ANSWER_TIMEOUT`] — is lost:
//! the same rule as for an HTTP/2 client that follows GOAWAY.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bound on one answer (a message that hangs is lost, not waited for).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// A line refused this many times in a row is lost.
const MAX_RETRIES: u32 = 5;

#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    retried: AtomicU64,
    lost: Mutex<Vec<String>>,
}

/// What an [`EchoLoad`] saw.
#[derive(Debug)]
pub struct EchoReport {
    /// Lines that came back as sent.
    pub ok: u64,
    /// Lines the server refused with its goodbye, then sent again.
    pub retried: u64,
    /// Every other failure, with when and why.
    pub lost: Vec<String>,
}

/// `connections` threads echoing flat out until [`EchoLoad::finish`].
pub struct EchoLoad {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoLoad {
    /// Starts echoing against `addr`.
    pub fn start(addr: SocketAddr, connections: usize) -> EchoLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let started = Instant::now();
        let threads = (0..connections)
            .map(|c| {
                let (stop, tally) = (stop.clone(), tally.clone());
                std::thread::spawn(move || echo_loop(addr, c, &stop, &tally, started))
            })
            .collect();
        EchoLoad {
            stop,
            tally,
            threads,
        }
    }

    /// Lines answered so far.
    pub fn ok(&self) -> u64 {
        self.tally.ok.load(Ordering::SeqCst)
    }

    /// Lost so far.
    pub fn lost(&self) -> Vec<String> {
        self.tally.lost.lock().expect("lost").clone()
    }

    /// Stops, lets every line in flight end, and reports.
    pub fn finish(self) -> EchoReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("echo client thread");
        }
        let tally = Arc::try_unwrap(self.tally).expect("client threads ended");
        EchoReport {
            ok: tally.ok.into_inner(),
            retried: tally.retried.into_inner(),
            lost: tally.lost.into_inner().expect("lost"),
        }
    }
}

/// How one line ended.
enum Answer {
    Echoed,
    /// The server's goodbye: send it again elsewhere.
    Refused,
    Lost(String),
}

fn echo_loop(addr: SocketAddr, c: usize, stop: &AtomicBool, tally: &Tally, started: Instant) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let line = format!("c{c} m{seq}\n");
        let mut tries = 0;
        loop {
            match exchange(&mut conn, addr, &line) {
                Answer::Echoed => {
                    tally.ok.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Answer::Refused if tries < MAX_RETRIES => {
                    tries += 1;
                    tally.retried.fetch_add(1, Ordering::SeqCst);
                    conn = None;
                }
                Answer::Refused => {
                    lose(tally, started, format!("{line:?} refused {tries} times"));
                    conn = None;
                    break;
                }
                Answer::Lost(why) => {
                    lose(tally, started, format!("{line:?}: {why}"));
                    conn = None;
                    break;
                }
            }
        }
    }
}

fn lose(tally: &Tally, started: Instant, why: String) {
    tally
        .lost
        .lock()
        .expect("lost")
        .push(format!("{:?}: {why}", started.elapsed()));
}

/// One line on `conn` (connecting first if there is none).
fn exchange(conn: &mut Option<BufReader<TcpStream>>, addr: SocketAddr, line: &str) -> Answer {
    if conn.is_none() {
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => return Answer::Lost(format!("connect: {e}")),
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = stream.set_read_timeout(Some(ANSWER_TIMEOUT)) {
            return Answer::Lost(format!("set_read_timeout: {e}"));
        }
        *conn = Some(BufReader::new(stream));
    }
    let Some(stream) = conn.as_mut() else {
        return Answer::Lost("no connection".into());
    };
    if let Err(e) = stream.get_mut().write_all(line.as_bytes()) {
        return Answer::Lost(format!("write: {e}"));
    }
    let mut answer = String::new();
    match stream.read_line(&mut answer) {
        Ok(_) if answer == line => Answer::Echoed,
        Ok(_) if answer == "BYE\n" => Answer::Refused,
        Ok(0) => Answer::Lost("EOF instead of an answer".into()),
        Ok(_) => Answer::Lost(format!("answer {answer:?}")),
        Err(e) => Answer::Lost(format!("read: {e}")),
    }
}
