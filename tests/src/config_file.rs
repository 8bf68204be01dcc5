//! Config files for tests of `--config`, and the wait that goes with re-reading one.

use std::path::{Path, PathBuf};

use crate::ops::RawHost;
use crate::status::status;
use crate::{lib, poll, WAIT};

/// A TOML basic string (paths in temp dirs need no escapes beyond what `{:?}` does).
pub fn toml_str(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// The four lines every test file starts with: lib (hello), host, port 0, pidfile in `dir`.
pub fn config_base(dir: &Path) -> String {
    format!(
        "lib = {}\nhost = \"127.0.0.1\"\nport = 0\npidfile = {}\n",
        toml_str(&lib("hello")),
        toml_str(&dir.join("angel.pid"))
    )
}

/// Writes `dir/angel.toml` = [`config_base`] + `extra`; returns its path.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("angel.toml");
    std::fs::write(&path, format!("{}{extra}", config_base(dir))).expect("write angel.toml");
    path
}

/// Waits until `status` shows exactly `n` ready workers, all of `generation`, and no others.
pub fn wait_generation(host: &RawHost, dir: &Path, generation: u64, n: usize) {
    poll(
        WAIT,
        &format!("{n} workers of generation {generation} and no others"),
        || host.log(),
        || {
            let status = status(&dir.join("angel.pid"));
            let all = status.workers.len();
            let ready = status.workers_in("ready");
            (all == n && ready.len() == n && ready.iter().all(|w| w.2 == generation)).then_some(())
        },
    );
}
