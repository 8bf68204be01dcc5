//! `axum-example`: an axum 0.8 app served by angel-host through [`angel::export_tower!`].
//!
//! | route | what |
//! |---|---|
//! | `GET /` | `Hello from axum:<pid>` (the body the load tests count) |
//! | `GET /healthz` | `ok` |
//! | `GET /hits` | JSON `{"hits": n, "pid": p}`: a per-worker counter in the shared state |
//! | `POST /items` | JSON `{"name": ".."}` in, `201` and `{"id": n, "name": ".."}` out |
//! | `GET /items?limit=n` | the first `n` items (query extractor), JSON |
//! | `GET /items/{id}` | one item (path extractor), or `404` |
//! | `GET /slow?ms=n` | answers after `n` ms (stopped by the 10 s timeout layer) |
//! | `GET /panic` | the handler panics: the SDK answers `500`, the worker keeps serving |
//! | `GET /ws` | a websocket echo; on drain it sends a Close frame (1001, going away) |
//!
//! Every request runs inside `tower-http`'s `request` span; the span and its `finished
//! processing request` event are raised to INFO so they reach the host's log with `ANGEL_LOG`
//! at its default.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use angel::tokio;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceBuilder;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

/// Longest a request may take before the timeout layer answers `408`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a draining websocket waits for the client to answer its Close frame.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct AppState {
    hits: AtomicU64,
    items: Mutex<BTreeMap<u64, Item>>,
    next_id: AtomicU64,
}

#[derive(Clone, Serialize)]
struct Item {
    id: u64,
    name: String,
}

#[derive(Deserialize)]
struct NewItem {
    name: String,
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

#[derive(Deserialize)]
struct SlowQuery {
    ms: u64,
}

async fn make_router(worker: &angel::Worker) -> Result<Router, Infallible> {
    tracing::info!(
        slot = worker.slot(),
        generation = worker.generation(),
        "axum app starting"
    );
    let state = Arc::new(AppState::default());
    // Crates that log through the `log` crate reach the host's log too (tracing-log).
    log::info!("routes ready");
    Ok(Router::new()
        .route("/", get(hello))
        .route("/healthz", get(|| async { "ok" }))
        .route("/hits", get(hits))
        .route("/items", get(list_items).post(create_item))
        .route("/items/{id}", get(get_item))
        .route("/slow", get(slow))
        .route("/panic", get(panics))
        .route("/ws", get(websocket))
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                        .on_response(DefaultOnResponse::new().level(Level::INFO)),
                )
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    REQUEST_TIMEOUT,
                )),
        ))
}

angel::export_tower!(init = make_router);

async fn hello(State(state): State<Arc<AppState>>) -> String {
    state.hits.fetch_add(1, Ordering::Relaxed);
    format!("Hello from axum:{}", std::process::id())
}

async fn hits(State(state): State<Arc<AppState>>) -> Json<serde_json_like::Hits> {
    Json(serde_json_like::Hits {
        hits: state.hits.load(Ordering::Relaxed),
        pid: std::process::id(),
    })
}

/// Response shapes that are not items.
mod serde_json_like {
    #[derive(serde::Serialize)]
    pub struct Hits {
        pub hits: u64,
        pub pid: u32,
    }
}

async fn create_item(
    State(state): State<Arc<AppState>>,
    Json(new): Json<NewItem>,
) -> (StatusCode, Json<Item>) {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let item = Item { id, name: new.name };
    tracing::info!(item_id = id, name = %item.name, "item created");
    state
        .items
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, item.clone());
    (StatusCode::CREATED, Json(item))
}

async fn list_items(
    State(state): State<Arc<AppState>>,
    Query(query): Query<ListQuery>,
) -> Json<Vec<Item>> {
    let items = state.items.lock().unwrap_or_else(PoisonError::into_inner);
    Json(
        items
            .values()
            .take(query.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect(),
    )
}

async fn get_item(State(state): State<Arc<AppState>>, Path(id): Path<u64>) -> Response {
    let items = state.items.lock().unwrap_or_else(PoisonError::into_inner);
    match items.get(&id) {
        Some(item) => Json(item.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no item {id}\n")).into_response(),
    }
}

async fn slow(Query(query): Query<SlowQuery>) -> String {
    tokio::time::sleep(Duration::from_millis(query.ms)).await;
    format!("slept {} ms:{}", query.ms, std::process::id())
}

async fn panics() -> &'static str {
    panic!("the /panic handler panics on purpose")
}

/// Upgrades to a websocket that echoes text and binary messages. The task holds the worker
/// ([`angel::hold_worker`]) so that, when the worker drains, it can still send its Close frame.
async fn websocket(upgrade: WebSocketUpgrade) -> Response {
    let hold = angel::hold_worker();
    upgrade.on_upgrade(move |socket| async move {
        echo(socket).await;
        drop(hold);
    })
}

async fn echo(mut socket: WebSocket) {
    let drain = angel::drain();
    loop {
        tokio::select! {
            biased;
            () = drain.drained() => break,
            message = socket.recv() => match message {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    if socket.send(message).await.is_err() {
                        return;
                    }
                }
                // Pings are answered by the protocol layer.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            },
        }
    }
    let goodbye = CloseFrame {
        code: close_code::AWAY,
        reason: "worker draining".into(),
    };
    if socket.send(Message::Close(Some(goodbye))).await.is_err() {
        return;
    }
    // Wait (bounded) for the client's Close reply, so the closing handshake completes.
    let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, async {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}
