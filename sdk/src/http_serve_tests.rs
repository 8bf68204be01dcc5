//! Unit tests of `http_serve.rs`.

use super::*;
use std::convert::Infallible;
use std::future::{ready, Ready};

type Respond = fn(Request<()>) -> Ready<Result<Response<()>, Infallible>>;
type TestService = AngelService<FnService<Respond>>;

fn respond(req: Request<()>) -> Ready<Result<Response<()>, Infallible>> {
    let status = if req.uri().path() == "/upgrade" {
        StatusCode::SWITCHING_PROTOCOLS
    } else {
        StatusCode::OK
    };
    ready(Ok(Response::builder().status(status).body(()).unwrap()))
}

fn service() -> (TestService, crate::drain::DrainTrigger, Arc<Shared>) {
    let (shared, trigger) = Shared::new(None, 0);
    let svc = AngelService {
        inner: FnService(respond as Respond),
        shared: Arc::clone(&shared),
        activity: Some(Arc::new(Activity::new(shared.drain.clone()))),
    };
    (svc, trigger, shared)
}

fn request(version: Version, path: &str) -> Request<()> {
    Request::builder()
        .version(version)
        .uri(path)
        .body(())
        .unwrap()
}

async fn connection_header(svc: &TestService, version: Version, path: &str) -> Option<String> {
    let response = svc.call(request(version, path)).await.unwrap();
    response
        .headers()
        .get(CONNECTION)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[test]
fn header_read_timeout_from_the_environment() {
    let default = Some(DEFAULT_HEADER_READ_TIMEOUT);
    assert_eq!(header_read_timeout_from(None), Ok(default));
    assert_eq!(
        header_read_timeout_from(Some(Ok("500ms"))),
        Ok(Some(Duration::from_millis(500)))
    );
    assert_eq!(
        header_read_timeout_from(Some(Ok("2m"))),
        Ok(Some(Duration::from_secs(120)))
    );
    assert_eq!(header_read_timeout_from(Some(Ok("0"))), Ok(None));
    let err = header_read_timeout_from(Some(Ok("soon"))).unwrap_err();
    assert!(err.contains("\"soon\""), "{err}");
    let raw = std::ffi::OsString::from("x");
    assert!(header_read_timeout_from(Some(Err(&raw))).is_err());
}

#[tokio::test]
async fn connection_close_only_while_draining_and_only_on_http1() {
    let (svc, trigger, shared) = service();
    assert_eq!(connection_header(&svc, Version::HTTP_11, "/").await, None);
    trigger.fire();
    assert_eq!(
        connection_header(&svc, Version::HTTP_11, "/")
            .await
            .as_deref(),
        Some("close")
    );
    assert_eq!(
        connection_header(&svc, Version::HTTP_10, "/")
            .await
            .as_deref(),
        Some("close")
    );
    assert_eq!(connection_header(&svc, Version::HTTP_2, "/").await, None);
    assert_eq!(
        connection_header(&svc, Version::HTTP_11, "/upgrade").await,
        None
    );
    assert_eq!(shared.requests(), 5);
}

#[tokio::test]
async fn drain_during_a_request_still_marks_its_response() {
    let (shared, trigger) = Shared::new(None, 0);
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release = Arc::new(std::sync::Mutex::new(Some(release_rx)));
    let svc = AngelService {
        inner: FnService(move |_req: Request<()>| {
            let rx = release.lock().unwrap().take().unwrap();
            async move {
                rx.await.unwrap();
                Ok::<_, Infallible>(Response::new(()))
            }
        }),
        activity: Some(Arc::new(Activity::new(shared.drain.clone()))),
        shared,
    };
    let pending = svc.call(request(Version::HTTP_11, "/"));
    trigger.fire();
    release_tx.send(()).unwrap();
    let response = pending.await.unwrap();
    assert_eq!(response.headers().get(CONNECTION).unwrap(), "close");
}
