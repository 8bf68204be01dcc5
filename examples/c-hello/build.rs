//! Compiles `hello.c` into a shared library, `libc_hello.so`, with the compiler the `cc` crate
//! picks (`$CC`, else `cc`/`gcc`), and copies it into the profile directory
//! (`target/<profile>/`) where the tests and `angel-host --lib` find the other apps.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let source = manifest.join("hello.c");
    let include = manifest.join("../../sdk/include");
    println!("cargo:rerun-if-changed={}", source.display());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("angel.h").display()
    );

    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .pic(true)
        .opt_level(2)
        .warnings(true)
        .extra_warnings(true)
        .get_compiler();
    let library = out.join("libc_hello.so");
    let mut cmd: Command = compiler.to_command();
    cmd.arg("-shared")
        .arg("-fPIC")
        .arg("-I")
        .arg(&include)
        .arg(&source)
        .arg("-o")
        .arg(&library);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {:?}: {e}", compiler.path()));
    assert!(status.success(), "compiling {} failed", source.display());

    // OUT_DIR is target/<profile>/build/c-hello-<hash>/out.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        copy_if_changed(&library, &profile_dir.join("libc_hello.so"));
    }
}

/// Replaces `to` with a fresh copy (a new inode, like cargo's own relink) only if it differs, so
/// a running `angel-host --watch` sees one change per real rebuild.
fn copy_if_changed(from: &Path, to: &Path) {
    let new = std::fs::read(from).expect("read the built library");
    if std::fs::read(to).is_ok_and(|old| old == new) {
        return;
    }
    let tmp = to.with_extension("so.tmp");
    std::fs::write(&tmp, &new).expect("write the library copy");
    std::fs::rename(&tmp, to).expect("move the library into place");
}
