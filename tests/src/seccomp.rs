//! A seccomp filter that refuses `clone` with `CLONE_PARENT` (`EPERM`), as some container
//! runtimes' profiles do: the zygote must then fall back to a double fork
//! (`host/src/worker/zygote.rs`). Installed in the master before it executes, so its whole
//! process tree runs under it.

use std::os::unix::process::CommandExt;
use std::process::Command;

// Classic BPF, as `linux/filter.h` and `linux/seccomp.h` define it.
/// `BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)`.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// `struct seccomp_data`: the syscall number, then the arch, the ip, and the arguments.
const NR_OFFSET: u32 = 0;
const ARG0_LOW_OFFSET: u32 = 16;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Makes `cmd`'s process (and every process it starts) get `EPERM` from a `clone` that asks
/// for `CLONE_PARENT`; every other system call, and every other `clone`, is allowed.
pub fn refuse_clone_parent(cmd: &mut Command) {
    let program = [
        op(BPF_LD_W_ABS, 0, 0, NR_OFFSET),
        op(BPF_JMP_JEQ_K, 0, 3, libc::SYS_clone as u32),
        op(BPF_LD_W_ABS, 0, 0, ARG0_LOW_OFFSET),
        op(BPF_JMP_JSET_K, 0, 1, libc::CLONE_PARENT as u32),
        op(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ];
    // SAFETY: the closure runs in the forked child before `exec`; it only calls `prctl`
    // (async-signal-safe) on a program that was built, and lives in the closure, before the
    // fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
