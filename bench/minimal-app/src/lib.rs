//! A bench reference, not an app to copy: `plain-hyper --http1`'s serving loop (hyper's
//! `http1` connection on each accepted socket, one task per connection, nothing around it),
//! loaded by angel-host as a cdylib.
//!
//! Against `plain-hyper --http1` it measures what the process model and being a dlopened
//! library cost per request (PIC code, general-dynamic TLS, the master and zygote beside the
//! workers); against `examples/hello` (the SDK's `serve_http`, same handler) what the SDK's
//! serving loop costs. `bench/scripts/cpu-per-request.py --lib minimal-app=…` runs it.
//!
//! It does not drain: once the worker drains it stops accepting and returns, dropping the
//! connections it has open, so the master's roll loses their requests. Never serve with it.

use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;

use angel::hyper_util::rt::TokioIo;

/// `examples/hello`'s handler, the one `plain-hyper` serves too.
#[path = "../../src/hello_handler.rs"]
mod hello_handler;
use hello_handler::hello;

async fn main(worker: angel::Worker) -> Result<(), angel::BoxError> {
    let listener = worker
        .raw_listeners()
        .iter()
        .find(|l| l.kind == angel::abi::LISTENER_TCP)
        .ok_or("minimal-app serves one TCP listener; the host gave it none")?;
    // SAFETY: the host owns the fd and keeps it open for the whole call of the app; we only
    // borrow it for the duplication.
    let fd: OwnedFd = unsafe { BorrowedFd::borrow_raw(listener.fd) }.try_clone_to_owned()?;
    // SAFETY: `fd` is a listening TCP socket we own (a fresh duplicate), handed over whole.
    let std = unsafe { std::net::TcpListener::from_raw_fd(fd.into_raw_fd()) };
    std.set_nonblocking(true)?;
    let listener = angel::tokio::net::TcpListener::from_std(std)?;
    let builder = angel::hyper::server::conn::http1::Builder::new();
    let message = hello_handler::message();
    let drain = worker.drain();
    worker.ready();
    loop {
        let (stream, _) = angel::tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            () = drain.drained() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            angel::hyper::service::service_fn({
                let message = Arc::clone(&message);
                move |req| hello(req, Arc::clone(&message))
            }),
        );
        angel::tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

angel::export!(main);
