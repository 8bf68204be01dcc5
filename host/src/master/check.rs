//! `--check`: validate the flags and the library without binding anything.

use super::*;

/// `angel-host --check`: validates the flags and runs one probe on a snapshot of the library.
pub fn check(cli: &Cli) -> Result<String, MasterError> {
    let cfg = Config::from_cli(cli);
    let snapshots = SnapshotDir::create(cli.snapshot_dir.as_deref())?;
    let snapshot = snapshots.take(&cfg.lib, 0)?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(io_err("finding /proc/self/exe"))?;
    let (ours, theirs) = control::pair().map_err(io_err("creating a control channel"))?;
    let args = WorkerArgs {
        lib: snapshot.path.clone(),
        probe: true,
        control_fd: theirs.as_raw_fd(),
        ..WorkerArgs::default()
    };
    let pid = spawn::spawn(&exe, &args).map_err(io_err("spawning the probe"))?;
    drop(theirs);
    let deadline = Instant::now() + cfg.ready_timeout;
    let mut failure = None;
    let status = loop {
        match control::recv_msg(&ours) {
            Ok(Recv::Msg(Msg::Failed(why))) => failure = Some(why),
            Ok(Recv::Msg(_)) => {}
            Ok(Recv::Eof) | Ok(Recv::Empty) | Err(_) => {}
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => break status,
            Err(e) => return Err(io_err("waiting for the probe")(e.into())),
        }
        if Instant::now() >= deadline {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(MasterError::Library(format!(
                "{}: loading did not finish within --ready-timeout {:?}",
                snapshot.source.display(),
                cfg.ready_timeout
            )));
        }
        let mut fds = [PollFd::new(ours.as_fd(), PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(10u16));
    };
    while let Ok(Recv::Msg(msg)) = control::recv_msg(&ours) {
        if let Msg::Failed(why) = msg {
            failure = Some(why);
        }
    }
    if !status_ok(&status) {
        let why = failure.unwrap_or_else(|| format!("probe {}", describe_status(&status)));
        return Err(MasterError::Library(format!(
            "{}: {why}",
            snapshot.source.display()
        )));
    }
    Ok(format!(
        "configuration ok: {} (sha {}, angel ABI {}, {} workers)",
        snapshot.source.display(),
        snapshot.short_sha(),
        angel::abi::ABI_VERSION,
        cfg.workers
    ))
}
