//! Apps in C: `examples/c-hello` (built by the workspace against `sdk/include/angel.h`) serves
//! and rolls without loss, and an app built against the ABI 1.0 layout still loads now that
//! the context has grown (ABI 1.1).

use angel_tests::load::Load;
use angel_tests::*;

#[test]
fn c_app_serves_and_rolls() {
    let host = Host::start(lib("c-hello"), &["--workers", "2"]);
    let first = get(host.addr(), "/").expect("GET /");
    assert!(
        first.text().starts_with("Hello from C:"),
        "{}",
        first.text()
    );
    assert!(first.closes());
    let log = host.log();
    assert!(log.contains("] c-hello serving listeners=1"), "{log}");

    let load = Load::start(host.addr(), 1, 2);
    let wait_ok = |n: u64| {
        wait_until(&host, WAIT, "requests to flow", || {
            (load.ok() >= n).then_some(())
        });
    };
    wait_ok(20);
    let old = host.worker_pids();
    for k in 0..3 {
        let roll = host.roll(WAIT);
        assert_eq!(roll.generation, k + 2, "{}", roll.line);
        let now = load.ok();
        wait_ok(now + 20);
    }
    let report = load.finish();
    report.assert_clean(&host, 0);
    // The first generation drained the C way: it logged, returned 0, and exited.
    host.wait_exited(&old, WAIT);
    for pid in old {
        let log = host.log();
        assert!(
            log.contains(&format!("worker[{pid}] c-hello drained")),
            "{log}"
        );
        assert!(!log.contains(&format!("worker {pid} died")), "{log}");
    }
}

const C_HEADERS: &str =
    "#include <poll.h>\n#include <stdint.h>\n#include <stdio.h>\n#include <string.h>\n";

/// A C app written against the ABI 1.0 layout (its own copy of the structs, as an app built
/// with the old header has): it must load, log, report ready, drain and exit cleanly.
const C_ABI_1_0: &str = r#"
const uint32_t angel_abi_version = 1;
int32_t angel_main(const context_1_0 *ctx) {
    if (ctx->size < sizeof(context_1_0)) return 76;
    char line[96];
    snprintf(line, sizeof line, "v1.0 app up (its context %zu bytes, the host's %u)",
             sizeof(context_1_0), ctx->size);
    ctx->host.log(ctx->host.data, 3, line, strlen(line));
    ctx->host.notify(ctx->host.data, 1, 0);
    struct pollfd p = { .fd = ctx->drain_fd, .events = POLLIN };
    while (poll(&p, 1, -1) < 0) {}
    ctx->host.log(ctx->host.data, 3, "v1.0 app drained", 16);
    return 0;
}
"#;

#[test]
fn abi_v1_fixture_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!("{C_HEADERS}{C_CONTEXT_1_0}{C_ABI_1_0}");
    let so = compile_c(dir.path(), "abi-1-0", &src);
    let host = Host::start(&so, &["--workers", "1"]);
    let up = host.wait_log("v1.0 app up", WAIT);
    assert!(up.contains("its context 96 bytes, the host's 104"), "{up}");
    let old = host.worker_pids();
    let roll = host.roll(WAIT);
    assert_eq!(roll.generation, 2);
    host.wait_exited(&old, WAIT);
    host.wait_log(&format!("worker[{}] v1.0 app drained", old[0]), WAIT);
    assert!(!host.log().contains(" died"), "{}", host.log());
}
