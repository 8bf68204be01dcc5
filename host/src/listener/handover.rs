//! The listeners handed from an old master to a new one in a self-upgrade, as
//! `LISTEN_FDS` with a name per fd that says where it belongs:
//!
//! - `angel.tcp.G.S[.i][.s]`: slot `S`'s socket of TCP group `G`; `.i` on slot 0 when it came
//!   from the service manager (it outlives us: never frozen), `.s` when the group is one
//!   shared inherited socket;
//! - `angel.unix.U[.o]`: unix socket `U`; `.o` when the old master bound it (so its file is
//!   removed at the final stop, by whichever master is then in charge).
//!
//! Socket activation's fds have names of the unit's choosing; these are the old master's, and
//! only a master started with `ANGEL_UPGRADE_PROTOCOL` reads them this way.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;

use socket2::Socket;

use super::{Listeners, TcpGroup};
use crate::activation::{Addr, Inherited};

/// Why the handed-over fds do not make a set of listeners.
#[derive(Debug, thiserror::Error)]
#[error("handover from the previous master: {0}")]
pub struct HandoverError(String);

impl Listeners {
    /// Every socket with its handover name, in a stable order.
    pub fn handover(&self) -> Vec<(BorrowedFd<'_>, String)> {
        let mut out = Vec::new();
        for (g, group) in self.tcp.iter().enumerate() {
            for (s, sock) in group.sockets.iter().enumerate() {
                let mut name = format!("angel.tcp.{g}.{s}");
                if s == 0 && group.inherited {
                    name.push_str(".i");
                }
                if group.shared {
                    name.push_str(".s");
                }
                out.push((sock.as_fd(), name));
            }
        }
        for (u, (sock, _)) in self.unix.iter().enumerate() {
            let mut name = format!("angel.unix.{u}");
            if !self.inherited_unix {
                name.push_str(".o");
            }
            out.push((sock.as_fd(), name));
        }
        out
    }

    /// The listeners a previous master handed over ([`Listeners::handover`]'s names). Until
    /// [`Listeners::take_charge`], unix socket files are not ours to remove: a new master that
    /// fails leaves them to the old one.
    pub fn from_handover(inherited: Vec<Inherited>) -> Result<(Self, bool), HandoverError> {
        let mut groups: BTreeMap<usize, BTreeMap<usize, (Inherited, bool, bool)>> = BTreeMap::new();
        let mut unix: BTreeMap<usize, (Inherited, bool)> = BTreeMap::new();
        for i in inherited {
            let name = i.name.clone().unwrap_or_default();
            let parts: Vec<&str> = name.split('.').collect();
            let index = |k: usize| parts.get(k).and_then(|p| p.parse::<usize>().ok());
            let flags = |from: usize| parts.iter().skip(from).copied().collect::<Vec<_>>();
            match (parts.first(), parts.get(1)) {
                (Some(&"angel"), Some(&"tcp")) => {
                    let (Some(g), Some(s)) = (index(2), index(3)) else {
                        return Err(HandoverError(format!("bad socket name {name:?}")));
                    };
                    let f = flags(4);
                    groups
                        .entry(g)
                        .or_default()
                        .insert(s, (i, f.contains(&"i"), f.contains(&"s")));
                }
                (Some(&"angel"), Some(&"unix")) => {
                    let Some(u) = index(2) else {
                        return Err(HandoverError(format!("bad socket name {name:?}")));
                    };
                    let owned = flags(3).contains(&"o");
                    unix.insert(u, (i, owned));
                }
                _ => {
                    return Err(HandoverError(format!(
                        "fd {name:?} is not one of angel-host's listeners"
                    )))
                }
            }
        }
        let mut out = Listeners::default();
        for (g, slots) in groups {
            let mut sockets = Vec::new();
            let (mut inherited, mut shared, mut addr) = (false, false, None);
            for (expected, (s, (i, is_inherited, is_shared))) in slots.into_iter().enumerate() {
                if s != expected {
                    return Err(HandoverError(format!(
                        "TCP group {g} has no socket for slot {expected}"
                    )));
                }
                let Addr::Tcp(a) = i.addr else {
                    return Err(HandoverError(format!(
                        "angel.tcp.{g}.{s} is not a TCP socket but {}",
                        i.addr.describe()
                    )));
                };
                if addr.is_some_and(|first| first != a) {
                    return Err(HandoverError(format!(
                        "TCP group {g} mixes addresses ({} and {a})",
                        addr.unwrap_or(a)
                    )));
                }
                addr = Some(a);
                inherited |= is_inherited;
                shared |= is_shared;
                sockets.push(Socket::from(i.fd));
            }
            if let Some(addr) = addr {
                out.tcp.push(TcpGroup {
                    addr,
                    sockets,
                    shared,
                    inherited,
                });
            }
        }
        let mut owned_unix = false;
        for (_, (i, owned)) in unix {
            let path = match &i.addr {
                Addr::Unix(p) => p.clone(),
                other => PathBuf::from(other.describe().trim_start_matches("unix:")),
            };
            owned_unix |= owned;
            out.unix.push((Socket::from(i.fd), path));
        }
        // Not ours to remove until we are in charge.
        out.inherited_unix = true;
        Ok((out, owned_unix))
    }

    /// A new master took over: unix socket files the old master bound are now ours to remove
    /// at the final stop.
    pub fn take_charge(&mut self, owned_unix: bool) {
        self.inherited_unix = !owned_unix;
    }

    /// A master that is not in charge stops: our copies close, the sockets stay as they are
    /// (the new master serves them, or the old one still does).
    pub fn release(&mut self) {
        self.tcp.clear();
        self.unix.clear();
    }
}

impl Listeners {
    /// How the listeners taken over differ from the addresses the settings ask for now: the
    /// ones asked for that none of them serves, and the ones nothing asks for any more. An
    /// upgrade keeps its predecessor's sockets (that is how no connection is lost), so a
    /// changed `--listen` takes a restart; the new master says so. A port 0 asked for matches
    /// the port it got. Sockets from the service manager (a TCP group marked so, or unix
    /// sockets the old master did not bind: `unix_owned` false) are its to choose: none differ.
    pub fn differences(
        &self,
        wanted: &[super::ListenAddr],
        unix_owned: bool,
    ) -> (Vec<String>, Vec<String>) {
        use super::ListenAddr;
        let from_manager = !self.unix.is_empty() && !unix_owned;
        if from_manager || self.tcp.iter().any(|g| g.inherited) {
            return (Vec::new(), Vec::new());
        }
        let serves = |w: &ListenAddr, g: &TcpGroup| match w {
            ListenAddr::Tcp(a) => {
                a.ip() == g.addr.ip() && (a.port() == 0 || a.port() == g.addr.port())
            }
            ListenAddr::Unix(_) => false,
        };
        let same_path = |a: &std::path::Path, b: &std::path::Path| {
            a == b || std::path::absolute(a).ok() == std::path::absolute(b).ok()
        };
        let missing = wanted
            .iter()
            .filter(|w| match w {
                ListenAddr::Tcp(_) => !self.tcp.iter().any(|g| serves(w, g)),
                ListenAddr::Unix(p) => !self.unix.iter().any(|(_, have)| same_path(p, have)),
            })
            .map(|w| match w {
                ListenAddr::Tcp(a) => a.to_string(),
                ListenAddr::Unix(p) => format!("unix:{}", p.display()),
            })
            .collect();
        let unwanted_tcp = self
            .tcp
            .iter()
            .filter(|g| !wanted.iter().any(|w| serves(w, g)))
            .map(|g| g.addr.to_string());
        let unwanted_unix = self
            .unix
            .iter()
            .filter(|(_, have)| {
                !wanted
                    .iter()
                    .any(|w| matches!(w, ListenAddr::Unix(p) if same_path(p, have)))
            })
            .map(|(_, have)| format!("unix:{}", have.display()));
        (missing, unwanted_tcp.chain(unwanted_unix).collect())
    }
}
