//! `c-hello`: an angel app written in C (`hello.c`, against `sdk/include/angel.h`).
//!
//! This crate has no Rust code of its own: its build script compiles `hello.c` with the system
//! C compiler into `libc_hello.so` and copies it next to the workspace's other app libraries
//! (`target/<profile>/libc_hello.so`), so `cargo build --workspace` builds it and
//! `angel-host --lib target/debug/libc_hello.so` serves it. A Rust cdylib could not carry the
//! C symbols: rustc exports only Rust items from a cdylib.

/// Where the build script put the library (inside this crate's `OUT_DIR`).
pub const LIBRARY: &str = concat!(env!("OUT_DIR"), "/libc_hello.so");
