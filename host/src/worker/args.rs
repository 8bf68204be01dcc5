//! What the master passes to a worker on its command line.

use std::ffi::OsString;
use std::os::fd::RawFd;

/// The argv word that selects worker mode (hidden from `--help`).
pub const WORKER_MODE: &str = "__worker";

/// What the master passes to a worker on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The inherited fd of the generation's snapshot (a sealed memfd, or a file the master
    /// holds open); loaded as `/proc/self/fd/N`, never by a path, so neither a temp cleaner
    /// nor a privilege drop can take it away.
    pub snapshot_fd: RawFd,
    /// Probe only: load and check the library, call nothing, exit.
    pub probe: bool,
    /// Probe only: once the library is checked, stay as the generation's zygote and fork its
    /// workers on request (`worker/zygote.rs`), instead of exiting.
    pub zygote: bool,
    /// Probe only: started ahead of its roll, with no snapshot yet; wait for `Msg::Load`.
    pub spare: bool,
    pub control_fd: RawFd,
    /// (fd, `abi::LISTENER_*`)
    pub listeners: Vec<(RawFd, u32)>,
    pub slot: u32,
    pub generation: u64,
    pub max_requests: u64,
    pub heartbeat_ms: u64,
    pub graceful_ms: u64,
    /// Log as JSON (`--log-format json` of the master).
    pub log_json: bool,
    /// `--user`/`--group` of the master, resolved: become them before loading the app.
    pub credentials: Option<String>,
}

impl Default for WorkerArgs {
    /// No snapshot and no control fd: not runnable until both are set.
    fn default() -> Self {
        WorkerArgs {
            snapshot_fd: -1,
            probe: false,
            zygote: false,
            spare: false,
            control_fd: -1,
            listeners: Vec::new(),
            slot: 0,
            generation: 0,
            max_requests: 0,
            heartbeat_ms: 0,
            graceful_ms: 0,
            log_json: false,
            credentials: None,
        }
    }
}

fn kv_push(argv: &mut Vec<OsString>, k: &str, v: String) {
    argv.push(k.into());
    argv.push(v.into());
}

impl WorkerArgs {
    /// The argv after the program name.
    pub fn to_argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec![WORKER_MODE.into()];
        let mut kv = |k: &str, v: String| {
            argv.push(k.into());
            argv.push(v.into());
        };
        kv("--snapshot-fd", self.snapshot_fd.to_string());
        kv("--control-fd", self.control_fd.to_string());
        for (fd, kind) in &self.listeners {
            kv("--listener", format!("{fd}:{kind}"));
        }
        kv("--slot", self.slot.to_string());
        kv("--generation", self.generation.to_string());
        kv("--max-requests", self.max_requests.to_string());
        kv("--heartbeat-ms", self.heartbeat_ms.to_string());
        kv("--graceful-ms", self.graceful_ms.to_string());
        if self.probe {
            argv.push("--probe".into());
        }
        if self.zygote {
            argv.push("--zygote".into());
        }
        if self.spare {
            argv.push("--spare".into());
        }
        if self.log_json {
            argv.push("--log-json".into());
        }
        if let Some(c) = &self.credentials {
            kv_push(&mut argv, "--credentials", c.clone());
        }
        argv
    }

    /// The fds the child inherits under the same numbers (CLOEXEC cleared only in it).
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.listeners.iter().map(|(fd, _)| *fd).collect();
        fds.push(self.control_fd);
        if self.snapshot_fd >= 0 {
            fds.push(self.snapshot_fd);
        }
        fds
    }

    /// Parses what [`WorkerArgs::to_argv`] produced (without the leading mode word).
    pub fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Self, String> {
        let mut out = WorkerArgs::default();
        fn num<T: std::str::FromStr>(k: &str, v: Option<OsString>) -> Result<T, String> {
            v.and_then(|v| v.to_str()?.parse().ok())
                .ok_or_else(|| format!("worker mode: bad value for {k}"))
        }
        while let Some(k) = args.next() {
            let k = k.to_string_lossy().into_owned();
            match k.as_str() {
                "--snapshot-fd" => out.snapshot_fd = num(&k, args.next())?,
                "--probe" => out.probe = true,
                "--zygote" => out.zygote = true,
                "--spare" => out.spare = true,
                "--log-json" => out.log_json = true,
                "--control-fd" => out.control_fd = num(&k, args.next())?,
                "--listener" => {
                    let v: String = num(&k, args.next())?;
                    let (fd, kind) = v
                        .split_once(':')
                        .and_then(|(f, k)| Some((f.parse().ok()?, k.parse().ok()?)))
                        .ok_or("worker mode: --listener wants fd:kind")?;
                    out.listeners.push((fd, kind));
                }
                "--slot" => out.slot = num(&k, args.next())?,
                "--generation" => out.generation = num(&k, args.next())?,
                "--max-requests" => out.max_requests = num(&k, args.next())?,
                "--heartbeat-ms" => out.heartbeat_ms = num(&k, args.next())?,
                "--graceful-ms" => out.graceful_ms = num(&k, args.next())?,
                "--credentials" => {
                    out.credentials = Some(
                        args.next()
                            .and_then(|v| v.into_string().ok())
                            .ok_or("worker mode: --credentials needs a value")?,
                    )
                }
                other => return Err(format!("worker mode: unknown argument {other}")),
            }
        }
        if out.control_fd < 0 || (out.snapshot_fd < 0 && !out.spare) {
            return Err("worker mode is internal to angel-host; run `angel-host --help`".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use angel::abi;

    #[test]
    fn worker_args_round_trip() {
        let args = WorkerArgs {
            snapshot_fd: 4,
            probe: false,
            zygote: true,
            spare: false,
            control_fd: 7,
            listeners: vec![(5, abi::LISTENER_TCP), (6, abi::LISTENER_UNIX)],
            slot: 2,
            generation: 3,
            max_requests: 1000,
            heartbeat_ms: 1000,
            graceful_ms: 30_000,
            log_json: true,
            credentials: Some("65534:65534:65534:nobody".into()),
        };
        let argv = args.to_argv();
        assert_eq!(argv[0], WORKER_MODE);
        assert_eq!(WorkerArgs::parse(argv.into_iter().skip(1)), Ok(args));
        assert!(WorkerArgs::parse(std::iter::empty()).is_err());
    }
}
