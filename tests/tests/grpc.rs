//! gRPC (tonic) through `serve_tower` over HTTP/2: calls are answered, and rolls under a tonic
//! client load lose no call.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use angel_tests::*;
use tonic::transport::Channel;

/// `hello.HelloRequest`, as in examples/grpc.
#[derive(Clone, PartialEq, prost::Message)]
struct HelloRequest {
    #[prost(string, tag = "1")]
    name: String,
}

/// `hello.HelloReply`, as in examples/grpc.
#[derive(Clone, PartialEq, prost::Message)]
struct HelloReply {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(uint32, tag = "2")]
    pid: u32,
}

/// One unary `hello.Greeter/SayHello` call, with tonic's generic client.
async fn say_hello(channel: Channel, name: &str) -> Result<HelloReply, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<HelloRequest, HelloReply>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/hello.Greeter/SayHello");
    let request = tonic::Request::new(HelloRequest {
        name: name.to_owned(),
    });
    Ok(grpc.unary(request, path, codec).await?.into_inner())
}

#[test]
fn grpc_calls_are_served_over_http2_and_errors_keep_their_status() {
    let host = Host::start(lib("grpc-example"), &["--workers", "1"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{}", host.addr().tcp());
    runtime.block_on(async {
        // Inside the runtime: the channel spawns its connection task there.
        let channel = Channel::from_shared(url).unwrap().connect_lazy();
        let reply = say_hello(channel.clone(), "angel").await.unwrap();
        assert_eq!(reply.message, "Hello, angel");
        assert_eq!(reply.pid as i32, host.worker_pids()[0]);
        let status = say_hello(channel, "").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(status.message(), "name is empty");
    });
}

const CLIENTS: usize = 4;
const ROLLS: u64 = 3;
/// Bound on one call: a hung call is a failure, not a hung test.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    pids: Mutex<std::collections::BTreeSet<u32>>,
}

/// A draining worker sends GOAWAY at once on HTTP/2: calls in flight finish, new ones go to the
/// new generation. A call the server refused unprocessed (a stream above the GOAWAY's last
/// stream id, or one still queued in the client when the connection closed) is retried, as
/// gRPC clients do transparently; anything else without an OK status is lost.
#[test]
fn grpc_service_rolls_under_a_tonic_client_load_with_zero_failed_calls() {
    let host = Host::start(lib("grpc-example"), &["--workers", "2"]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{}", host.addr().tcp());
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (url, stop, tally) = (url.clone(), stop.clone(), tally.clone());
            runtime.spawn(async move {
                // One HTTP/2 connection per client, reconnected by tonic after a GOAWAY.
                let channel = Channel::from_shared(url).unwrap().connect_lazy();
                let mut n = 0u64;
                let mut retries = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let name = format!("client {i} call {n}");
                    match tokio::time::timeout(CALL_TIMEOUT, say_hello(channel.clone(), &name))
                        .await
                    {
                        Ok(Err(status))
                            if retries < 5
                                && std::error::Error::source(&status)
                                    .is_some_and(angel_tests::h2client::refused_unprocessed) =>
                        {
                            retries += 1;
                            n -= 1;
                            continue;
                        }
                        Ok(Ok(reply)) if reply.message == format!("Hello, {name}") => {
                            retries = 0;
                            tally.ok.fetch_add(1, Ordering::SeqCst);
                            tally.pids.lock().unwrap().insert(reply.pid);
                        }
                        Ok(Ok(reply)) => tally
                            .failures
                            .lock()
                            .unwrap()
                            .push(format!("bad reply {reply:?}")),
                        Ok(Err(status)) => tally
                            .failures
                            .lock()
                            .unwrap()
                            .push(format!("{name}: {status}")),
                        Err(_) => tally
                            .failures
                            .lock()
                            .unwrap()
                            .push(format!("{name}: timed out")),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    let wait_ok = |n: u64| {
        wait_until(&host, WAIT, "gRPC calls to succeed", || {
            (tally.ok.load(Ordering::SeqCst) >= n).then_some(())
        })
    };
    wait_ok(20);
    for k in 0..ROLLS {
        let old = host.worker_pids();
        let roll = host.roll(WAIT);
        assert_eq!(roll.generation, k + 2, "{}", roll.line);
        // The old generation drains: HTTP/2 clients move to the new one and it exits.
        host.wait_exited(&old, WAIT);
        let now = tally.ok.load(Ordering::SeqCst);
        wait_ok(now + 20);
    }
    stop.store(true, Ordering::SeqCst);
    runtime.block_on(async {
        for c in clients {
            c.await.unwrap();
        }
    });
    let failures = tally.failures.lock().unwrap();
    let ok = tally.ok.load(Ordering::SeqCst);
    assert!(
        failures.is_empty(),
        "{} of {} calls failed across {ROLLS} rolls: {:#?}\n--- master stderr ---\n{}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)],
        host.log()
    );
    let pids = tally.pids.lock().unwrap();
    assert!(
        pids.len() >= 4,
        "calls reached several generations: {pids:?}"
    );
}
