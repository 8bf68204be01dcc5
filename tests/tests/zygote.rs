//! A generation's zygote: the probe, once it loaded and checked the library, stays and forks
//! the generation's workers (`host/src/worker/zygote.rs`). They are the master's children,
//! share the library's relocated pages, and log under their own pids; a dead zygote only
//! means the next workers are exec'd; `--no-zygote` execs them all.

use angel_tests::ops::ctl;
use angel_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The parent pid of `pid` (field 4 of `/proc/PID/stat`).
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// What `ps` shows for `pid`: its argv, NULs as spaces, trimmed.
fn cmdline(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw)
        .replace('\0', " ")
        .trim()
        .to_string()
}

/// The master's children whose command line starts with `prefix`.
fn children_titled(master: i32, prefix: &str) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
    else {
        return Vec::new();
    };
    tasks
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| cmdline(p).starts_with(prefix))
        .collect()
}

/// Kilobytes of the worker's mappings of the library snapshot that are anonymous (the
/// pages relocation wrote, copied on write), and that are private to it.
fn library_relocated_kb(pid: i32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut anonymous, mut private, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            inside = line.contains("memfd:angel-host gen");
            continue;
        }
        if !inside {
            continue;
        }
        let kb = |l: &str| -> u64 {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Anonymous:") {
            anonymous += kb(line);
        } else if line.starts_with("Private_Dirty:") {
            private += kb(line);
        }
    }
    (anonymous, private)
}

fn the_zygote(host: &Host, generation: u64) -> i32 {
    let title = format!("angel-host: zygote (generation {generation})");
    let found = wait_until(host, WAIT, &format!("a child titled {title:?}"), || {
        let z = children_titled(host.pid, &title);
        (z.len() == 1).then(|| z[0])
    });
    found
}

#[test]
fn a_generations_workers_are_forked_from_its_zygote_as_the_masters_children() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let zygote = the_zygote(&host, 1);
    let workers = hello_pids(&host, 2);
    for &pid in &workers {
        let ctx = || format!("worker {pid}\n--- master stderr ---\n{}", host.log());
        assert_eq!(
            ppid(pid),
            Some(host.pid),
            "a forked worker is the master's child: {}",
            ctx()
        );
        assert!(
            cmdline(pid).starts_with("angel-host: worker (generation 1, slot "),
            "{:?}: {}",
            cmdline(pid),
            ctx()
        );
        // Its log lines carry its own pid, not the zygote's.
        assert!(
            host.log().contains(&format!("worker[{pid}] listening")),
            "{}",
            ctx()
        );
        // The library's relocated pages are the zygote's, shared copy-on-write.
        let (relocated, private) = library_relocated_kb(pid);
        assert!(
            relocated > 0 && private * 2 < relocated,
            "relocated pages of the library: {relocated} kB, of them private {private} kB: {}",
            ctx()
        );
    }
    assert!(
        !host.log().contains(&format!("worker[{zygote}]")),
        "the zygote logs nothing\n{}",
        host.log()
    );

    // A roll gets a zygote of its own; the replaced generation's zygote is killed.
    let roll = host.roll(WAIT);
    assert_eq!(roll.generation, 2);
    the_zygote(&host, 2);
    wait_until(&host, WAIT, "the zygote of generation 1 to be gone", || {
        (!pid_running(zygote)).then_some(())
    });
    let second = the_zygote(&host, 2);
    host.signal(Signal::SIGTERM);
    assert!(host.wait_exit(WAIT).success(), "{}", host.log());
    assert!(!pid_running(second), "the zygote dies with the master");
}

#[test]
fn a_zygote_killed_from_outside_leaves_the_generation_serving_on_exec_workers() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let zygote = the_zygote(&host, 1);
    let mark = host.mark();
    kill(Pid::from_raw(zygote), Signal::SIGKILL).expect("kill the zygote");
    host.wait_log_since(
        mark,
        &format!("zygote {zygote} of generation 1 is gone (was killed by SIGKILL); its next workers start by exec"),
        WAIT,
    );
    let victim = *hello_pids(&host, 1).iter().next().expect("a worker");
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill a worker");
    let replacement = wait_until(&host, WAIT, "a replacement worker", || {
        host.worker_pids()
            .into_iter()
            .find(|p| *p != victim && !cmdline(*p).starts_with("angel-host: worker (generation"))
    });
    assert!(
        cmdline(replacement).contains("__worker"),
        "the replacement was exec'd: {:?}",
        cmdline(replacement)
    );
    hello_pids(&host, 2);
    // And the next roll forks from a new zygote again.
    host.roll(WAIT);
    the_zygote(&host, 2);
}

#[test]
fn no_zygote_execs_every_worker() {
    let host = Host::start(lib("hello"), &["--workers", "2", "--no-zygote"]);
    for pid in hello_pids(&host, 2) {
        assert!(
            cmdline(pid).contains("__worker"),
            "{pid} was exec'd: {:?}",
            cmdline(pid)
        );
        let (relocated, private) = library_relocated_kb(pid);
        assert!(
            relocated > 0 && private >= relocated,
            "an exec'd worker relocates the library itself: {relocated} kB relocated, {private} kB private"
        );
    }
    assert!(children_titled(host.pid, "angel-host: zygote").is_empty());
}

#[test]
fn a_spare_probe_waits_for_the_next_roll_and_becomes_its_zygote() {
    let host = Host::start(lib("hello"), &["--workers", "2"]);
    let spare = wait_until(&host, WAIT, "a spare probe", || {
        let s = children_titled(host.pid, "angel-host: spare probe");
        (s.len() == 1).then(|| s[0])
    });
    assert_eq!(ppid(spare), Some(host.pid));
    // `status` names both helpers.
    let zygote = the_zygote(&host, 1);
    let shown = status_value(host.pidfile());
    let helpers = shown["helpers"].as_array().cloned().unwrap_or_default();
    let has = |role: &str, pid: i32, generation: Option<u64>| {
        helpers
            .iter()
            .any(|h| h["role"] == role && h["pid"] == pid && h["generation"].as_u64() == generation)
    };
    assert!(
        has("zygote", zygote, Some(1)) && has("spare", spare, None),
        "{shown}"
    );
    let text = ctl(host.pidfile(), &["status"]).stdout;
    assert!(
        text.contains(&format!("zygote {zygote} (generation 1)")),
        "{text}"
    );
    assert!(text.contains(&format!("spare {spare}")), "{text}");
    let roll = host.roll(WAIT);
    assert_eq!(roll.generation, 2);
    assert_eq!(
        the_zygote(&host, 2),
        spare,
        "the spare loaded generation 2\n{}",
        host.log()
    );
    wait_until(&host, WAIT, "a new spare after the roll", || {
        let s = children_titled(host.pid, "angel-host: spare probe");
        (s.len() == 1 && s[0] != spare).then_some(())
    });
    hello_pids(&host, 2);
}

/// A C app whose library initialiser starts a thread: a process with two threads cannot be
/// forked safely (a lock the other thread holds would stay locked in the child).
const C_THREADED_INIT: &str = r#"
static void *idle(void *arg) { for (;;) pause(); return arg; }
__attribute__((constructor)) static void start_thread(void) {
    pthread_t t;
    pthread_create(&t, 0, idle, 0);
    pthread_detach(t);
}
const uint32_t angel_abi_version = 1;
int32_t angel_main(const context_1_0 *ctx) {
    ctx->host.notify(ctx->host.data, 1, 0);
    struct pollfd p = { .fd = ctx->drain_fd, .events = POLLIN };
    while (poll(&p, 1, -1) < 0) {}
    return 0;
}
"#;

#[test]
fn a_library_whose_initialiser_starts_a_thread_gets_exec_workers_not_a_zygote() {
    let dir = tempfile::tempdir().unwrap();
    let headers = "#include <poll.h>\n#include <pthread.h>\n#include <stdint.h>\n#include <stddef.h>\n#include <unistd.h>\n";
    let src = format!("{headers}{C_CONTEXT_1_0}{C_THREADED_INIT}");
    let so = compile_c(dir.path(), "threaded-init", &src);
    let host = Host::start(&so, &["--workers", "2"]);
    let workers = wait_until(&host, WAIT, "two ready workers", || {
        let w = host.worker_pids();
        (w.len() == 2).then_some(w)
    });
    for pid in workers {
        assert!(
            cmdline(pid).contains("__worker"),
            "{pid} was exec'd: {:?}\n{}",
            cmdline(pid),
            host.log()
        );
    }
    assert!(children_titled(host.pid, "angel-host: zygote").is_empty());
    // It rolls all the same (a spare probe loads the build, finds the thread, exits).
    assert_eq!(host.roll(WAIT).generation, 2);
    assert!(children_titled(host.pid, "angel-host: zygote").is_empty());
}

/// Where a seccomp profile refuses `clone(CLONE_PARENT)` (some container runtimes'), the
/// zygote says so once and forks each worker through a middle process that exits at once:
/// the workers are still the master's children (it is their child subreaper), serve, are
/// replaced when they die, and no middle process is left behind, through a roll too.
#[test]
fn where_clone_parent_is_refused_workers_are_double_forked_and_still_the_masters_children() {
    let host = Host::builder(lib("hello"))
        .args(["--workers", "2"])
        .refuse_clone_parent()
        .start();
    let zygote = the_zygote(&host, 1);
    let workers = hello_pids(&host, 2);
    assert!(
        host.log().contains("clone(CLONE_PARENT) is refused here")
            && host.log().contains("forks its workers with a double fork"),
        "{}",
        host.log()
    );
    let only_workers = |generation: u64| {
        let children = children_titled(host.pid, "");
        let zygote_title = format!("angel-host: zygote (generation {generation})");
        children
            .into_iter()
            .filter(|&p| {
                let title = cmdline(p);
                title != zygote_title && !title.starts_with("angel-host: spare probe")
            })
            .collect::<Vec<_>>()
    };
    for &pid in &workers {
        assert_eq!(ppid(pid), Some(host.pid), "worker {pid}\n{}", host.log());
        assert!(
            cmdline(pid).starts_with("angel-host: worker (generation 1, slot "),
            "{:?}",
            cmdline(pid)
        );
    }
    // The zygote reaped every middle process: none is left as its child or the master's.
    wait_until(&host, WAIT, "no child of the zygote", || {
        std::fs::read_to_string(format!("/proc/{zygote}/task/{zygote}/children"))
            .is_ok_and(|c| c.trim().is_empty())
            .then_some(())
    });
    // A killed worker is noticed and replaced, forked the same way.
    let victim = *workers.iter().next().expect("a worker");
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill a worker");
    let replacement = wait_until(&host, WAIT, "a replacement worker", || {
        host.worker_pids()
            .into_iter()
            .find(|p| !workers.contains(p))
    });
    // Its middle process exits right after the fork; from then on it is the master's.
    wait_until(
        &host,
        WAIT,
        "the replacement to be the master's child",
        || (ppid(replacement) == Some(host.pid)).then_some(()),
    );
    assert!(
        cmdline(replacement).starts_with("angel-host: worker (generation 1, slot "),
        "forked, not exec'd: {:?}",
        cmdline(replacement)
    );
    hello_pids(&host, 2);
    // A roll onto a new zygote forks the same way; then only its workers remain.
    let roll = host.roll(WAIT);
    assert_eq!(roll.generation, 2);
    the_zygote(&host, 2);
    wait_until(&host, WAIT, "only generation 2's two workers", || {
        let w = only_workers(2);
        (w.len() == 2
            && w.iter()
                .all(|&p| cmdline(p).starts_with("angel-host: worker (generation 2, slot ")))
        .then_some(())
    });
    host.signal(Signal::SIGTERM);
    assert!(host.wait_exit(WAIT).success(), "{}", host.log());
}
