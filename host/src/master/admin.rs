//! Serving the control socket: `status`, `reload` (answered when its roll ends) and `stop`.

use super::*;

impl Master {
    /// Answers every client waiting on the control socket.
    pub(super) fn serve_ctl(&mut self) {
        while let Some((stream, request)) = self.ctl.as_ref().and_then(ctl::Server::accept) {
            match request {
                Some(ctl::Request::Status) => ctl::reply(&stream, &self.status()),
                Some(ctl::Request::Reload) => {
                    if self.stop.is_some() {
                        ctl::reply(
                            &stream,
                            &self.outcome(false, 0, "master is stopping".into()),
                        );
                        continue;
                    }
                    tracing::info!(event = "reload_requested", "reload requested");
                    // The roll this request starts, or the follow-up of the one under way.
                    let generation = match &self.roll {
                        Some(roll) => roll.generation + 1,
                        None => self.next_generation,
                    };
                    self.reload_waiters.push((stream, generation));
                    self.start_roll(Trigger::Explicit);
                }
                Some(ctl::Request::Stop) | Some(ctl::Request::StopFast) => {
                    let fast = request == Some(ctl::Request::StopFast);
                    tracing::info!(
                        event = "stop_requested",
                        "stop{} requested",
                        if fast { " --fast" } else { "" }
                    );
                    ctl::reply(&stream, &self.outcome(true, 0, "stopping".into()));
                    self.stop_waiters.push(stream);
                    match (fast, self.stop) {
                        (true, _) | (false, Some(Stop::Graceful)) => self.begin_stop(Stop::Fast),
                        (false, None) => self.begin_stop(Stop::Graceful),
                        (false, Some(Stop::Fast)) => {}
                    }
                }
                None => ctl::reply(
                    &stream,
                    &self.outcome(
                        false,
                        0,
                        "unknown request; expected status, reload, stop or stop-fast".into(),
                    ),
                ),
            }
        }
    }

    fn outcome(&self, ok: bool, generation: u64, message: String) -> ctl::ReloadOutcome {
        ctl::ReloadOutcome {
            ok,
            generation,
            message,
        }
    }

    /// A roll ended (committed, failed or skipped): answer the `reload` clients waiting for it.
    pub(super) fn roll_outcome(&mut self, generation: u64, ok: bool, message: &str) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reload_waiters)
            .into_iter()
            .partition(|(_, wanted)| *wanted <= generation || self.stop.is_some());
        self.reload_waiters = waiting;
        for (stream, _) in done {
            ctl::reply(&stream, &self.outcome(ok, generation, message.to_string()));
        }
    }

    pub(super) fn status(&self) -> ctl::Status {
        let serving = self.serving.and_then(|g| self.generations.get(&g));
        let now = Instant::now();
        let mut workers: Vec<ctl::WorkerStatus> = self
            .workers
            .iter()
            .filter(|w| w.state != WorkerState::Probing)
            .map(|w| ctl::WorkerStatus {
                pid: w.pid.as_raw(),
                slot: w.slot,
                generation: w.generation,
                state: format!("{:?}", w.state).to_lowercase(),
                age_secs: now.duration_since(w.started).as_secs_f64(),
                requests: w.requests,
            })
            .collect();
        workers.sort_by_key(|w| (w.generation, w.slot, w.pid));
        ctl::Status {
            pid: self.pid.as_raw(),
            uptime_secs: now.duration_since(self.started_at).as_secs_f64(),
            generation: self.serving.unwrap_or(0),
            lib: self.cfg.lib.clone(),
            library: serving.map(|s| s.source.clone()),
            sha256: serving.map(|s| s.sha256.clone()),
            listening: self.listeners.describe(),
            rolling: self.roll.as_ref().is_some_and(|r| r.settle_until.is_none())
                || self.roll_pending.is_some(),
            settling: self.roll.as_ref().is_some_and(|r| r.settle_until.is_some()),
            stopping: self.stop.is_some(),
            configured_workers: self.cfg.workers,
            workers,
        }
    }
}
