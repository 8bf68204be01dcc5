//! The watch: a change of the library or of another path matching `--reload-regex`, and
//! the debounce that waits for writes in place to settle.

use std::path::Path;

use super::*;

impl Core {
    /// Notes a change of the library (or a link to it) or of another path matching
    /// `--reload-regex`, and (re)starts the debounce; or, for a library replaced at once (a
    /// rename or a hard link into place: cargo's uplift, `mv`, `ln -sfn`), rolls now.
    ///
    /// An atomic replace leaves nothing to wait for: the new file is complete the moment its
    /// name appears, and the roll snapshots it then. The debounce exists for writes in place
    /// (`cp`, `rsync --inplace`), which are visible half-done, and for other paths matching
    /// `--reload-regex` (a burst of them usually belongs to one build). Measured: the debounce
    /// made cargo's relink → new code serving take the debounce plus a roll; without it, the
    /// roll alone.
    pub(super) fn on_file_changed(
        &mut self,
        path: &Path,
        library: bool,
        writing: bool,
        replaced: bool,
    ) {
        // During an upgrade the new master snapshots the library as it is when it starts.
        if self.stopping() || self.upgrade.in_progress() {
            return;
        }
        // Without --reload-regex the library (or a link to it) triggers; with it, exactly the
        // paths it matches do.
        let triggers = match &self.s.matcher.0 {
            None => library,
            Some(_) => self.s.matcher.matches(path),
        };
        if !triggers {
            return;
        }
        if library && replaced {
            // What was pending is covered by this roll (it snapshots the library as it is
            // now), except a change of another matching path: that one still forces a roll
            // even when the library's content turns out unchanged.
            let other = matches!(self.debounce, Debounce::Waiting { other: true, .. });
            self.debounce = Debounce::Quiet;
            return self.start_roll(if other {
                Trigger::WatchOther
            } else {
                Trigger::Watch
            });
        }
        let due = self.now + self.s.debounce;
        let (since, was_writing, other) = match self.debounce {
            Debounce::Waiting {
                since,
                writing,
                other,
                ..
            } => (since, writing, other),
            Debounce::Quiet => (self.now, false, false),
        };
        self.debounce = Debounce::Waiting {
            since,
            due,
            writing: if library { writing } else { was_writing },
            other: other || !library,
        };
    }

    /// The debounce ran out: roll, unless the library is still being written (bounded).
    pub(super) fn debounce_due(&mut self) {
        let Debounce::Waiting {
            since,
            due,
            writing,
            other,
        } = self.debounce
        else {
            return;
        };
        if due > self.now {
            return;
        }
        if writing && self.now.duration_since(since) < WRITE_SETTLE_MAX {
            // The writer has not closed the library yet: wait for it.
            self.debounce = Debounce::Waiting {
                since,
                due: self.now + self.s.debounce,
                writing,
                other,
            };
            return;
        }
        self.debounce = Debounce::Quiet;
        self.start_roll(if other {
            Trigger::WatchOther
        } else {
            Trigger::Watch
        });
    }
}
