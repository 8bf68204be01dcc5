//! angel-host: a pre-forking master that serves Rust cdylib apps and rolls them gracefully.
//!
//! # Theory of operation
//!
//! One binary, two modes. The **master** (`angel-host --lib libapp.so`) binds every listener
//! once ([`listener`]), writes the pidfile ([`pidfile`]), and runs a single-threaded `poll`
//! loop ([`master`]) over a signal self-pipe ([`signals`]) and one control channel per worker
//! ([`control`]). It never loads app code. Each **worker** is this binary again, fork+exec'd
//! ([`spawn`]) in a hidden mode ([`worker`]): it dlopens its generation's private snapshot of
//! the library ([`snapshot`]), checks the ABI version, and calls the app's entry with its
//! listeners, a drain fd and host callbacks (the ABI lives in `angel::abi`).
//!
//! A **roll** (SIGHUP) snapshots the library, validates it in a probe process, starts a new
//! generation on the same listening sockets, and — only once every new worker reported ready
//! — tells the old workers to drain: stop accepting, finish in-flight requests, exit. Because
//! the sockets never close, nothing queued in the kernel is lost; because the old generation
//! drains only after the new one is ready, a bad build never replaces a good one.
#![warn(clippy::unwrap_used)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub(crate) mod activation;
pub mod cli;
pub mod config;
pub(crate) mod control;
pub mod ctl;
pub(crate) mod listener;
pub mod log;
pub mod master;
pub(crate) mod metrics;
pub(crate) mod notify;
pub(crate) mod pidfile;
pub(crate) mod privdrop;
pub(crate) mod settings;
pub(crate) mod signals;
pub(crate) mod snapshot;
pub(crate) mod spawn;
pub(crate) mod successor;
pub(crate) mod watch;
pub mod worker;
