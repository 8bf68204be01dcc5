//! An honest HTTP/2 load: hyper-util's pooled client with prior knowledge, as a Rust service
//! calling another would use it.
//!
//! Honest means: every request that does not end in a 2xx with its whole body is lost,
//! except one kind, which is retried: a stream the server refused without processing it (a
//! GOAWAY whose last stream id is below it, or `REFUSED_STREAM`; RFC 9113 §8.7 says the client
//! may retry those, and real clients do). Those retries are counted separately.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Bound on one request, body included (a stream that hangs is lost, not waited for).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A request refused this many times in a row is lost.
const MAX_RETRIES: u32 = 5;

#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    retried: AtomicU64,
    lost: Mutex<Vec<String>>,
    /// Answers per worker pid (bodies end in `:<pid>`).
    pids: Mutex<BTreeMap<i32, u64>>,
}

/// What an [`H2Load`] saw.
#[derive(Debug)]
pub struct H2Report {
    /// Requests answered with a 2xx and their whole body.
    pub ok: u64,
    /// Requests the server refused unprocessed (GOAWAY / `REFUSED_STREAM`), then retried.
    pub retried: u64,
    /// Every other failure, with when and why.
    pub lost: Vec<String>,
    /// Answers per worker pid.
    pub pids: BTreeMap<i32, u64>,
}

/// `connections` hyper-util clients (each keeps one HTTP/2 connection: the pool multiplexes)
/// with `streams` concurrent request loops each, on a runtime of their own.
pub struct H2Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    thread: JoinHandle<()>,
}

impl H2Load {
    /// Starts requesting `GET path` from `addr` until [`H2Load::finish`].
    pub fn start(addr: SocketAddr, connections: usize, streams: usize, path: &str) -> H2Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let uri: hyper::Uri = format!("http://{addr}{path}").parse().expect("uri");
        let (s, t) = (stop.clone(), tally.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("client runtime");
            rt.block_on(async move {
                let started = Instant::now();
                let mut tasks = Vec::new();
                for _ in 0..connections {
                    let client = Client::builder(TokioExecutor::new())
                        .http2_only(true)
                        .build_http::<Empty<Bytes>>();
                    for _ in 0..streams {
                        let (client, uri, stop, tally) =
                            (client.clone(), uri.clone(), s.clone(), t.clone());
                        tasks.push(tokio::spawn(async move {
                            while !stop.load(Ordering::SeqCst) {
                                one_request(&client, &uri, &tally, started).await;
                            }
                        }));
                    }
                }
                for task in tasks {
                    task.await.expect("request loop");
                }
            });
        });
        H2Load {
            stop,
            tally,
            thread,
        }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.tally.ok.load(Ordering::SeqCst)
    }

    /// Answers so far from a pid not in `old`.
    pub fn ok_from_others(&self, old: &[i32]) -> u64 {
        let pids = self.tally.pids.lock().expect("pids");
        pids.iter()
            .filter(|(pid, _)| !old.contains(pid))
            .map(|(_, n)| n)
            .sum()
    }

    /// Stops, lets every request in flight end, and reports.
    pub fn finish(self) -> H2Report {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("client thread");
        let tally = Arc::try_unwrap(self.tally).expect("client tasks ended");
        H2Report {
            ok: tally.ok.into_inner(),
            retried: tally.retried.into_inner(),
            lost: tally.lost.into_inner().expect("lost"),
            pids: tally.pids.into_inner().expect("pids"),
        }
    }
}

type H2Client = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// One request, retried only while the server refuses it unprocessed.
async fn one_request(client: &H2Client, uri: &hyper::Uri, tally: &Tally, started: Instant) {
    let lose = |why: String| {
        tally
            .lost
            .lock()
            .expect("lost")
            .push(format!("{:?}: {why}", started.elapsed()));
    };
    for _ in 0..=MAX_RETRIES {
        let request = Request::get(uri.clone())
            .body(Empty::new())
            .expect("request");
        let attempt = async {
            let response = client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Err(_) => return lose(format!("no answer within {REQUEST_TIMEOUT:?}")),
            Ok(Ok((status, body))) => {
                let text = String::from_utf8_lossy(&body);
                if !status.is_success() {
                    return lose(format!("status {status}: {text:?}"));
                }
                let pid = text.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
                let Some(pid) = pid else {
                    return lose(format!("body {text:?} does not end in :<pid>"));
                };
                tally.ok.fetch_add(1, Ordering::SeqCst);
                *tally.pids.lock().expect("pids").entry(pid).or_default() += 1;
                return;
            }
            Ok(Err(e)) if refused_unprocessed(&*e) => {
                tally.retried.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Err(e)) => return lose(error_chain(&*e)),
        }
    }
    lose(format!("refused {} times in a row", MAX_RETRIES + 1));
}

/// Whether the server refused the stream without processing it: a remote GOAWAY that did not
/// cover it, or `REFUSED_STREAM`; or the request never left the client, queued on a
/// connection that closed first (hyper's `Canceled`, which hyper-util's pooled client retries
/// by itself and tonic's channel does not).
pub fn refused_unprocessed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cause = c.source();
    }
    false
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}
