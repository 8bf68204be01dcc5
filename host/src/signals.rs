//! Signal handling for the master: each signal sets a flag and writes a byte to a self-pipe
//! (a socketpair, as signal-hook recommends) that the master's `poll` loop watches. All real
//! work happens in the loop, outside the handlers.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR2};

/// The signals the master acts on, in the order one loop iteration handles them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Chld,
    Hup,
    Ttin,
    Ttou,
    Term,
    Quit,
    Int,
    /// Upgrade the master itself (nginx's and unicorn's signal).
    Usr2,
}

impl Sig {
    const ALL: [(Sig, i32); 8] = [
        (Sig::Chld, SIGCHLD),
        (Sig::Hup, SIGHUP),
        (Sig::Ttin, SIGTTIN),
        (Sig::Ttou, SIGTTOU),
        (Sig::Term, SIGTERM),
        (Sig::Quit, SIGQUIT),
        (Sig::Int, SIGINT),
        (Sig::Usr2, SIGUSR2),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Sig::Chld => "SIGCHLD",
            Sig::Hup => "SIGHUP",
            Sig::Ttin => "SIGTTIN",
            Sig::Ttou => "SIGTTOU",
            Sig::Term => "SIGTERM",
            Sig::Quit => "SIGQUIT",
            Sig::Int => "SIGINT",
            Sig::Usr2 => "SIGUSR2",
        }
    }
}

/// Registered handlers plus the read end of the wake-up pipe.
pub struct Signals {
    wake: UnixStream,
    flags: Vec<(Sig, Arc<AtomicBool>)>,
}

impl Signals {
    pub fn install() -> io::Result<Self> {
        let (wake, write) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut flags = Vec::new();
        for (sig, raw) in Sig::ALL {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(raw, Arc::clone(&flag))?;
            signal_hook::low_level::pipe::register(raw, write.try_clone()?)?;
            flags.push((sig, flag));
        }
        Ok(Signals { wake, flags })
    }

    /// The fd that becomes readable when a signal arrived.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Signals received since the last call, each at most once, in handling order.
    pub fn take(&mut self) -> Vec<Sig> {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        self.flags
            .iter()
            .filter(|(_, flag)| flag.swap(false, Ordering::SeqCst))
            .map(|(sig, _)| *sig)
            .collect()
    }
}
