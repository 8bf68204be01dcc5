//! Artifacts built by `cargo build --workspace`, and the bad libraries the tests feed the host.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/debug/` (or whichever profile dir holds the running test binary).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test-binary> → target/debug
    let deps = exe.parent().expect("test binary has a parent dir");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent dir")
    } else {
        deps
    };
    dir.to_path_buf()
}

fn artifact(file: &str) -> PathBuf {
    let path = target_dir().join(file);
    assert!(
        path.is_file(),
        "missing build artifact {}: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// The `angel-host` binary.
pub fn host_bin() -> PathBuf {
    artifact("angel-host")
}

/// A cdylib of the workspace by crate name (`-` becomes `_`): `lib("hello")` → `libhello.so`.
pub fn lib(crate_name: &str) -> PathBuf {
    artifact(&format!("lib{}.so", crate_name.replace('-', "_")))
}

/// A valid ABI v1 app (C) whose `angel_main` never reports ready.
pub const C_NEVER_READY: &str = r#"
#include <stdint.h>
#include <unistd.h>
uint32_t angel_abi_version = 1;
int32_t angel_main(const void *ctx) { (void)ctx; for (;;) pause(); return 0; }
"#;

/// A valid ABI v1 app (C) that segfaults in `angel_main`.
pub const C_SEGFAULT: &str = r#"
#include <stdint.h>
uint32_t angel_abi_version = 1;
int32_t angel_main(const void *ctx) { (void)ctx; *(volatile int *)0 = 42; return 0; }
"#;

/// An app (C) that speaks ABI version 2.
pub const C_ABI_V2: &str = r#"
#include <stdint.h>
uint32_t angel_abi_version = 2;
int32_t angel_main(const void *ctx) { (void)ctx; return 0; }
"#;

/// A perfectly good shared object that exports no angel symbol.
pub const C_NO_SYMBOLS: &str = r#"
int not_an_angel_app(int x) { return x + 1; }
"#;

/// The ABI 1.0 structs in C, as an app built with the first header declares them (put
/// before a C app's source: it needs `<stdint.h>` and `<stddef.h>` first).
pub const C_CONTEXT_1_0: &str = r#"
typedef struct { int fd; uint32_t kind; } listener;
typedef struct {
    void *data;
    int (*notify)(void *, uint32_t, uint64_t);
    void (*log)(void *, uint32_t, const char *, size_t);
    void (*fail)(void *, const char *, size_t);
} host_api;
typedef struct {
    uint32_t size, abi_version;
    const listener *listeners;
    uint32_t listener_count;
    int drain_fd;
    uint32_t slot;
    uint64_t generation, max_requests, heartbeat_interval_ms, graceful_timeout_ms;
    host_api host;
} context_1_0;
"#;

/// Compiles `src` with `gcc -shared -fPIC` into `dir/<name>.so` and returns its path.
pub fn compile_c(dir: &Path, name: &str, src: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    let so = dir.join(format!("{name}.so"));
    std::fs::write(&c, src).expect("write C source");
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&c)
        .output()
        .expect("run gcc (is it installed?)");
    assert!(
        out.status.success(),
        "gcc failed for {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// Every way a library can be bad, as a test would deploy it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadLib {
    /// The path does not exist.
    Missing,
    /// The path is a directory.
    Directory,
    /// A text file.
    Text,
    /// A zero-byte file.
    Empty,
    /// A shared object without angel symbols.
    NoSymbols,
    /// `angel_abi_version = 2`.
    AbiV2,
    /// Rust fixture `panic-init`: panics in init, before ready.
    PanicInit,
    /// C app that never reports ready.
    NeverReady,
    /// C app that segfaults in `angel_main`.
    Segfault,
    /// Rust fixture `exit-after-ready`: reports ready, then returns at once.
    ExitAfterReady,
}

impl BadLib {
    /// Materialises the bad library as a fresh file in `dir` (no file for `Missing`).
    pub fn create(self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("bad-{self:?}.so").to_lowercase());
        match self {
            BadLib::Missing => {}
            BadLib::Directory => std::fs::create_dir(&path).expect("mkdir"),
            BadLib::Text => {
                std::fs::write(&path, "this is not an ELF shared object\n").expect("write text")
            }
            BadLib::Empty => std::fs::write(&path, b"").expect("write empty"),
            BadLib::NoSymbols => return compile_c(dir, "no-symbols", C_NO_SYMBOLS),
            BadLib::AbiV2 => return compile_c(dir, "abi-v2", C_ABI_V2),
            BadLib::NeverReady => return compile_c(dir, "never-ready", C_NEVER_READY),
            BadLib::Segfault => return compile_c(dir, "segfault", C_SEGFAULT),
            BadLib::PanicInit => return super::lib("panic-init"),
            BadLib::ExitAfterReady => return super::lib("exit-after-ready"),
        }
        path
    }

    /// Puts this bad library at `target` the way a deploy would: `cp` over the served file
    /// (same inode, rewritten in place), or `rm` for `Missing`.
    pub fn deploy(self, scratch: &Path, target: &Path) {
        if self == BadLib::Missing {
            std::fs::remove_file(target).expect("rm served library");
            return;
        }
        let src = self.create(scratch);
        std::fs::copy(&src, target).expect("cp bad library over the served one");
    }
}

/// Deploys `src` over `target` like `cp` (rewrites the served file in place).
pub fn deploy(src: &Path, target: &Path) {
    std::fs::copy(src, target).unwrap_or_else(|e| {
        panic!("cp {} {}: {e}", src.display(), target.display());
    });
}
