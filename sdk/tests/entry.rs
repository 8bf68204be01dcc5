//! `angel_main` in-process: a fake host (real sockets, real drain fd, callbacks that record)
//! drives `__private::run` the way the worker does.

use std::ffi::{c_char, c_int, c_void};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use angel::abi;
use angel::bytes::Bytes;
use angel::http::{Request, Response};
use angel::http_body_util::Full;
use angel::hyper::body::Incoming;
use angel::tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Every wait in these tests ends after this, failing with what was recorded so far.
const DEADLINE: Duration = Duration::from_secs(10);

/// The SDK keeps process-global state for the one entry call of a worker: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Recorder {
    state: Mutex<Recorded>,
    changed: Condvar,
}

#[derive(Default, Debug, Clone)]
struct Recorded {
    events: Vec<(u32, u64)>,
    logs: Vec<(u32, String)>,
    /// Structured records: (level, target, message, fields, spans).
    records: Vec<(u32, String, String, String, String)>,
    fails: Vec<String>,
}

impl Recorder {
    fn record(&self, f: impl FnOnce(&mut Recorded)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state);
        self.changed.notify_all();
    }

    fn snapshot(&self) -> Recorded {
        self.state.lock().unwrap().clone()
    }

    /// Waits until `pred` holds, at most [`DEADLINE`].
    fn wait_for(&self, what: &str, pred: impl Fn(&Recorded) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut state = self.state.lock().unwrap();
        while !pred(&state) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("timed out waiting for {what}; recorded {state:?}"));
            state = self.changed.wait_timeout(state, left).unwrap().0;
        }
    }

    fn count(&self, event: u32) -> usize {
        self.snapshot()
            .events
            .iter()
            .filter(|(e, _)| *e == event)
            .count()
    }
}

/// # Safety
/// `data` is the `Recorder` of a live `FakeHost`.
unsafe fn recorder<'a>(data: *mut c_void) -> &'a Recorder {
    // SAFETY: per this function's contract.
    unsafe { &*data.cast::<Recorder>() }
}

/// # Safety
/// `msg` points to `len` readable bytes.
unsafe fn text(msg: *const c_char, len: usize) -> String {
    if msg.is_null() || len == 0 {
        return String::new();
    }
    // SAFETY: per this function's contract.
    let bytes = unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len) };
    String::from_utf8_lossy(bytes).into_owned()
}

unsafe extern "C" fn notify(data: *mut c_void, event: u32, value: u64) -> c_int {
    // SAFETY: the context's data is the fake host's recorder, alive during the call.
    unsafe { recorder(data) }.record(|r| r.events.push((event, value)));
    0
}

unsafe extern "C" fn log(data: *mut c_void, level: u32, msg: *const c_char, len: usize) {
    // SAFETY: as in `notify`; the SDK passes `len` bytes at `msg`.
    let line = unsafe { text(msg, len) };
    // SAFETY: as in `notify`.
    unsafe { recorder(data) }.record(|r| r.logs.push((level, line)));
}

unsafe extern "C" fn log_record(data: *mut c_void, record: *const abi::LogRecord) {
    // SAFETY: the SDK passes a record valid for the call.
    let r = unsafe { &*record };
    assert_eq!(r.size as usize, std::mem::size_of::<abi::LogRecord>());
    // SAFETY: the record's strings are valid for the call.
    let fields = unsafe {
        (
            r.level,
            text(r.target, r.target_len),
            text(r.message, r.message_len),
            text(r.fields, r.fields_len),
            text(r.spans, r.spans_len),
        )
    };
    // SAFETY: as in `notify`.
    unsafe { recorder(data) }.record(|rec| rec.records.push(fields));
}

unsafe extern "C" fn fail(data: *mut c_void, msg: *const c_char, len: usize) {
    // SAFETY: as in `log`.
    let line = unsafe { text(msg, len) };
    // SAFETY: as in `notify`.
    unsafe { recorder(data) }.record(|r| r.fails.push(line));
}

/// What the worker process would own: listeners, the host end of the drain channel.
struct FakeHost {
    recorder: Arc<Recorder>,
    tcp: TcpListener,
    drain_host_end: UnixStream,
    drain_app_end: UnixStream,
}

/// The context, sendable to the thread that plays the worker's main thread.
struct SendContext(abi::Context, #[allow(dead_code)] Box<[abi::Listener]>);

impl FakeHost {
    fn new() -> Self {
        let (drain_host_end, drain_app_end) = UnixStream::pair().unwrap();
        Self {
            recorder: Arc::default(),
            tcp: TcpListener::bind("127.0.0.1:0").unwrap(),
            drain_host_end,
            drain_app_end,
        }
    }

    fn context(&self, max_requests: u64, heartbeat_interval_ms: u64) -> SendContext {
        let listeners: Box<[abi::Listener]> = Box::new([abi::Listener {
            fd: self.tcp.as_raw_fd(),
            kind: abi::LISTENER_TCP,
        }]);
        let ctx = abi::Context {
            size: std::mem::size_of::<abi::Context>() as u32,
            abi_version: abi::ABI_VERSION,
            listeners: listeners.as_ptr(),
            listener_count: listeners.len() as u32,
            drain_fd: self.drain_app_end.as_raw_fd(),
            slot: 3,
            generation: 7,
            max_requests,
            heartbeat_interval_ms,
            graceful_timeout_ms: 5_000,
            host: abi::HostApi {
                data: Arc::as_ptr(&self.recorder).cast_mut().cast(),
                notify,
                log,
                fail,
            },
            log_record: Some(log_record),
        };
        SendContext(ctx, listeners)
    }

    /// Runs `angel_main` on a thread like the worker's main thread; returns its exit code's
    /// receiver.
    fn start<F, Fut, E>(&self, ctx: SendContext, main: F) -> mpsc::Receiver<i32>
    where
        F: FnOnce(angel::Worker) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: Into<angel::BoxError>,
    {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let ctx = ctx;
            // SAFETY: the context, its listener array, the recorder and the fds outlive the
            // call: the test keeps the `FakeHost` alive until it has the exit code.
            let code = unsafe { angel::__private::run(&ctx.0, main) };
            let _ = tx.send(code);
        });
        rx
    }

    fn drain(&self) {
        (&self.drain_host_end).write_all(b"d").unwrap();
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.tcp.local_addr().unwrap()).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream
    }
}

fn exit_code(rx: &mpsc::Receiver<i32>) -> i32 {
    rx.recv_timeout(DEADLINE)
        .expect("angel_main did not return in time")
}

/// One HTTP/1.1 response: (head lowercased, body). Reads exactly content-length bytes.
fn get(stream: &mut TcpStream, path: &str) -> (String, String) {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    read_response(stream)
}

fn read_response(stream: &mut TcpStream) -> (String, String) {
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "EOF in head: {head}"
        );
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    assert!(reader.buffer().is_empty(), "unexpected bytes after body");
    (head, String::from_utf8(body).unwrap())
}

fn wait_until_draining() {
    let deadline = Instant::now() + DEADLINE;
    while !angel::drain().is_draining() {
        assert!(Instant::now() < deadline, "the app never saw the drain");
        std::thread::sleep(Duration::from_millis(1));
    }
}

async fn handler(
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let body = match req.uri().path() {
        "/wait-for-drain" => {
            angel::drain().drained().await;
            "drained".to_owned()
        }
        _ => "hi".to_owned(),
    };
    Ok(Response::new(Full::new(Bytes::from(body))))
}

#[test]
fn http_serves_reports_and_drains_with_connection_close() {
    let _serial = serial();
    let host = FakeHost::new();
    let done = host.start(host.context(2, 10), |worker: angel::Worker| async move {
        assert_eq!((worker.slot(), worker.generation()), (3, 7));
        worker.serve_http(handler).await
    });
    host.recorder
        .wait_for("ready", |r| r.events.contains(&(abi::EVENT_READY, 0)));

    let mut conn = host.connect();
    let (head, body) = get(&mut conn, "/");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "hi");
    assert_eq!(host.recorder.count(abi::EVENT_RETIRING), 0);
    host.recorder
        .wait_for("a heartbeat counting the request", |r| {
            r.events.contains(&(abi::EVENT_HEARTBEAT, 1))
        });

    // The request reaching max_requests retires the worker: it drains by itself, so this
    // request (kept alive, waiting for the drain) is answered with `Connection: close`.
    write!(conn, "GET /wait-for-drain HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    host.recorder.wait_for("retiring at max_requests", |r| {
        r.events.contains(&(abi::EVENT_RETIRING, 2))
    });
    host.drain();
    let (head, body) = read_response(&mut conn);
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "drained");
    let mut rest = Vec::new();
    assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0, "server closes");

    assert_eq!(exit_code(&done), abi::EXIT_OK);
    let recorded = host.recorder.snapshot();
    assert_eq!(recorded.events[0], (abi::EVENT_READY, 0));
    assert_eq!(host.recorder.count(abi::EVENT_READY), 1);
    assert_eq!(host.recorder.count(abi::EVENT_RETIRING), 1);
    assert!(recorded.fails.is_empty(), "{recorded:?}");
}

#[test]
fn a_request_during_drain_gets_connection_close() {
    let _serial = serial();
    let host = FakeHost::new();
    let done = host.start(host.context(0, 0), |worker: angel::Worker| {
        worker.serve_http(handler)
    });
    host.recorder
        .wait_for("ready", |r| r.events.contains(&(abi::EVENT_READY, 0)));
    let mut conn = host.connect();
    assert_eq!(get(&mut conn, "/").1, "hi");
    host.drain();
    wait_until_draining();
    // Within the linger: the kept-alive connection still works, and is told to close.
    let (head, _) = get(&mut conn, "/");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(exit_code(&done), abi::EXIT_OK);
    assert_eq!(host.recorder.count(abi::EVENT_HEARTBEAT), 0);
}

#[test]
fn tcp_handlers_see_the_drain_and_run_returns_after_them() {
    let _serial = serial();
    let host = FakeHost::new();
    let done = host.start(host.context(0, 0), |worker: angel::Worker| {
        worker.serve_tcp(|stream, drain| async move {
            let mut stream = angel::tokio::io::BufReader::new(stream);
            let mut line = String::new();
            loop {
                line.clear();
                angel::tokio::select! {
                    () = drain.drained() => break,
                    read = stream.read_line(&mut line) => {
                        if read.unwrap_or(0) == 0 {
                            return;
                        }
                        stream.write_all(line.as_bytes()).await.unwrap();
                    }
                }
            }
            stream.write_all(b"bye\n").await.unwrap();
            stream.shutdown().await.unwrap();
        })
    });
    host.recorder
        .wait_for("ready", |r| r.events.contains(&(abi::EVENT_READY, 0)));
    let mut conn = host.connect();
    conn.write_all(b"ping\n").unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "ping\n");
    host.drain();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "bye\n");
    assert_eq!(exit_code(&done), abi::EXIT_OK);
}

#[test]
fn unix_listeners_serve_http_too() {
    use std::os::unix::net::UnixListener;
    let _serial = serial();
    let host = FakeHost::new();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("angel-entry-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let unix = UnixListener::bind(&path).unwrap();
    let mut ctx = host.context(0, 0);
    ctx.1 = Box::new([
        ctx.1[0],
        abi::Listener {
            fd: unix.as_raw_fd(),
            kind: abi::LISTENER_UNIX,
        },
    ]);
    ctx.0.listeners = ctx.1.as_ptr();
    ctx.0.listener_count = 2;
    let done = host.start(ctx, |worker: angel::Worker| worker.serve_http(handler));
    host.recorder
        .wait_for("ready", |r| r.events.contains(&(abi::EVENT_READY, 0)));
    let mut conn = UnixStream::connect(&path).unwrap();
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(conn, "GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(response.ends_with("\r\n\r\nhi"), "{response}");
    assert_eq!(get(&mut host.connect(), "/").1, "hi");
    host.drain();
    assert_eq!(exit_code(&done), abi::EXIT_OK);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn an_app_error_is_reported_through_fail() {
    let _serial = serial();
    let host = FakeHost::new();
    let done = host.start(host.context(0, 0), |_worker: angel::Worker| async {
        Err::<(), _>(std::io::Error::other("no database"))
    });
    assert_eq!(exit_code(&done), abi::EXIT_APP_ERROR);
    assert_eq!(host.recorder.snapshot().fails, ["no database"]);
}

#[test]
fn a_panic_is_caught_and_reported() {
    let _serial = serial();
    let host = FakeHost::new();
    let done = host.start(host.context(0, 0), |_worker: angel::Worker| async {
        if true {
            panic!("kaboom {}", 42);
        }
        Ok::<(), angel::BoxError>(())
    });
    assert_eq!(exit_code(&done), abi::EXIT_APP_PANIC);
    assert_eq!(host.recorder.snapshot().fails, ["app panicked: kaboom 42"]);
}

#[test]
fn a_bad_context_is_refused_without_calling_the_app() {
    let _serial = serial();
    let never = |_worker: angel::Worker| async { Err::<(), angel::BoxError>("the app ran".into()) };
    // SAFETY: null is allowed.
    let code = unsafe { angel::__private::run(std::ptr::null(), never) };
    assert_eq!(code, abi::EXIT_HOST_ERROR);

    let host = FakeHost::new();
    let mut ctx = host.context(0, 0);
    ctx.0.size = 8;
    // SAFETY: the context is valid (only its size lies).
    let code = unsafe { angel::__private::run(&ctx.0, never) };
    assert_eq!(code, abi::EXIT_ABI_MISMATCH);
    assert!(host.recorder.snapshot().fails.is_empty());
}

#[test]
fn angel_threads_selects_a_multi_thread_runtime() {
    let _serial = serial();
    let host = FakeHost::new();
    std::env::set_var(angel::THREADS_ENV, "2");
    let done = host.start(host.context(0, 0), |_worker: angel::Worker| async {
        let flavor = angel::tokio::runtime::Handle::current().runtime_flavor();
        assert_eq!(flavor, angel::tokio::runtime::RuntimeFlavor::MultiThread);
        Ok::<(), angel::BoxError>(())
    });
    let code = exit_code(&done);
    std::env::set_var(angel::THREADS_ENV, "many");
    let bad = host.start(host.context(0, 0), |_worker: angel::Worker| async {
        Ok::<(), angel::BoxError>(())
    });
    let bad_code = exit_code(&bad);
    std::env::remove_var(angel::THREADS_ENV);
    assert_eq!(code, abi::EXIT_OK, "{:?}", host.recorder.snapshot());
    assert_eq!(bad_code, abi::EXIT_APP_ERROR);
    assert!(host.recorder.snapshot().fails[0].contains("ANGEL_THREADS"));
}

/// What `tracing_reaches_the_host_as_structured_records` and the ABI 1.0 test log.
async fn traced_main(_worker: angel::Worker) -> Result<(), angel::BoxError> {
    let span = tracing::info_span!("request", method = "GET");
    let _entered = span.enter();
    tracing::info!(status = 200u64, path = "/x", "finished");
    tracing::debug!("filtered out at the default `info`");
    log::warn!(target: "legacy", "from the log crate");
    Ok(())
}

#[test]
fn tracing_reaches_the_host_as_structured_records() {
    let _serial = serial();
    let host = FakeHost::new();
    let done = host.start(host.context(0, 0), traced_main);
    assert_eq!(exit_code(&done), abi::EXIT_OK);
    let records = host.recorder.snapshot().records;
    assert_eq!(
        records[0],
        (
            abi::LOG_INFO,
            "entry".to_owned(),
            "finished".to_owned(),
            r#"{"path":"/x","status":200}"#.to_owned(),
            r#"[{"method":"GET","name":"request"}]"#.to_owned(),
        ),
        "{records:?}"
    );
    assert_eq!(records.len(), 2, "the debug event is filtered: {records:?}");
    assert_eq!(
        (records[1].0, records[1].1.as_str(), records[1].2.as_str()),
        (abi::LOG_WARN, "legacy", "from the log crate")
    );
}

#[test]
fn an_abi_1_0_host_context_is_accepted_and_gets_plain_log_lines() {
    let _serial = serial();
    let host = FakeHost::new();
    let mut ctx = host.context(0, 0);
    // A host that predates `log_record` passes the 1.0 size (and has no such field).
    ctx.0.size = abi::CONTEXT_V1_SIZE as u32;
    let done = host.start(ctx, traced_main);
    assert_eq!(exit_code(&done), abi::EXIT_OK);
    let recorded = host.recorder.snapshot();
    assert!(recorded.records.is_empty(), "{recorded:?}");
    assert!(
        recorded
            .logs
            .contains(&(abi::LOG_INFO, "finished path=/x status=200".to_owned())),
        "{recorded:?}"
    );
}
