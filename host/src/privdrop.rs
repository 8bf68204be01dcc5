//! `--user` / `--group`: workers run the app as an unprivileged user while the master stays
//! root (it needs root to bind low ports at start, to join a root-created reuseport group of
//! inherited sockets, and to signal workers of any uid).
//!
//! # Theory
//!
//! The master resolves the names once at start ([`resolve`]: a typo fails the start, not
//! every worker) and passes the numbers to each worker ([`Credentials::to_arg`] /
//! [`Credentials::parse_arg`], one argv word). The worker, right after exec and **before it
//! loads the app** (dlopen runs the app's initialisers), calls [`drop_privileges`]:
//! `setgroups` (the user's supplementary groups, or only `--group` when given), `setgid`,
//! `setuid` — in that order, because after `setuid` the process may no longer change its
//! groups — then verifies the result: real, effective and saved ids are the target ones, the
//! group list is the target one, and `setuid(0)` now fails. A drop that cannot be verified
//! is an error: the worker exits instead of serving with privileges it should not have.
//!
//! What the worker must still reach after the drop: its inherited fds (listeners, the control
//! channel; unaffected) and its snapshot. The snapshot directory is 0700 root, so after the
//! drop the worker cannot open the snapshot by its path (`EACCES`); an fd to it opened by
//! root and inherited still reads through `/proc/self/fd/N` as long as the file itself is
//! readable (0644) — both checked by `drops_to_nobody_in_a_child_process`. So the master hands
//! each worker its generation's snapshot as an fd (`dlopen("/proc/self/fd/N")`, DESIGN: a
//! generation stays loadable), or makes the directory the worker user's.
//!
//! After the uid change the kernel marks the worker non-dumpable (no core dumps, `/proc/PID`
//! owned by root). We keep it so: a dumpable worker could be ptraced by any other process of
//! the same unprivileged user and robbed of the listening sockets root opened.
//!
//! # Wiring
//!
//! - master, at start: `let creds = cli.user.map(|u| resolve(&u, cli.group.as_deref())).transpose()?;`
//!   (a usage error, exit 2); with credentials and a non-root master, refuse at start (the
//!   [`PrivError::NotRoot`] text) rather than in every worker.
//! - `WorkerArgs` gains `credentials: Option<Credentials>`, on the command line as
//!   `--credentials <to_arg()>`, parsed with [`Credentials::parse_arg`].
//! - `worker::run`, after the fds are marked CLOEXEC and **before `load`** — in the probe
//!   too, which also dlopens the app: `drop_privileges(&creds)`; on error send
//!   `Msg::Failed(e.to_string())` and exit with `EXIT_HOST_ERROR`, so a roll fails loudly.

use std::ffi::CString;

use nix::unistd::{Gid, Group, Uid, User};

/// Why credentials could not be resolved or taken.
#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error("--group {0}: no such group")]
    NoSuchGroup(String),
    #[error("--user {0}: uid without a passwd entry; give --group too")]
    NeedsGroup(String),
    #[error("looking up {what}: {source}")]
    Lookup { what: String, source: nix::Error },
    #[error("cannot switch to user {user}: running as uid {euid}, not root (run the master as root, or drop --user)")]
    NotRoot { user: String, euid: u32 },
    #[error("cannot switch to user {user}: {step} failed: {source}")]
    Set {
        user: String,
        step: &'static str,
        source: nix::Error,
    },
    #[error("switched to user {user}, but {what}")]
    Verify { user: String, what: String },
    #[error("bad credentials argument {0:?} (want uid:gid:group,group,...)")]
    BadArg(String),
}

/// Who a worker runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// For messages: the name given (or found) for the user.
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<Gid>,
}

/// Resolves `--user` (a name or a number) and `--group` (a name or a number; default: the
/// user's primary group). Supplementary groups: the user's (as `initgroups` would set them)
/// without `--group`, only the group with it.
pub fn resolve(user: &str, group: Option<&str>) -> Result<Credentials, PrivError> {
    let lookup = |what: String| move |source| PrivError::Lookup { what, source };
    let by_name = User::from_name(user).map_err(lookup(format!("user {user}")))?;
    let entry = match (by_name, user.parse::<u32>()) {
        (Some(u), _) => Some(u),
        (None, Ok(n)) => User::from_uid(Uid::from_raw(n)).map_err(lookup(format!("uid {n}")))?,
        (None, Err(_)) => return Err(PrivError::NoSuchUser(user.to_string())),
    };
    let gid = match group {
        Some(g) => Some(resolve_group(g)?),
        None => None,
    };
    match entry {
        Some(u) => {
            let groups = match gid {
                Some(g) => vec![g],
                None => {
                    let name = CString::new(u.name.as_str())
                        .map_err(|_| PrivError::NoSuchUser(user.to_string()))?;
                    nix::unistd::getgrouplist(&name, u.gid)
                        .map_err(lookup(format!("the groups of {}", u.name)))?
                }
            };
            Ok(Credentials {
                user: u.name,
                uid: u.uid,
                gid: gid.unwrap_or(u.gid),
                groups,
            })
        }
        // A bare uid (containers often run as an id with no passwd entry).
        None => {
            let uid = user
                .parse::<u32>()
                .map_err(|_| PrivError::NoSuchUser(user.to_string()))?;
            let gid = gid.ok_or_else(|| PrivError::NeedsGroup(user.to_string()))?;
            Ok(Credentials {
                user: user.to_string(),
                uid: Uid::from_raw(uid),
                gid,
                groups: vec![gid],
            })
        }
    }
}

fn resolve_group(group: &str) -> Result<Gid, PrivError> {
    let lookup = |source| PrivError::Lookup {
        what: format!("group {group}"),
        source,
    };
    if let Some(g) = Group::from_name(group).map_err(lookup)? {
        return Ok(g.gid);
    }
    // A number is taken as is, with or without a group entry.
    group
        .parse::<u32>()
        .map(Gid::from_raw)
        .map_err(|_| PrivError::NoSuchGroup(group.to_string()))
}

impl Credentials {
    /// One argv word for the worker: `uid:gid:g1,g2,...:name`.
    pub fn to_arg(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(|g| g.to_string()).collect();
        format!(
            "{}:{}:{}:{}",
            self.uid,
            self.gid,
            groups.join(","),
            self.user
        )
    }

    /// Parses what [`Credentials::to_arg`] produced.
    pub fn parse_arg(arg: &str) -> Result<Credentials, PrivError> {
        let bad = || PrivError::BadArg(arg.to_string());
        let mut parts = arg.splitn(4, ':');
        let mut num = || -> Result<u32, PrivError> {
            parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)
        };
        let uid = Uid::from_raw(num()?);
        let gid = Gid::from_raw(num()?);
        let groups = parts
            .next()
            .ok_or_else(bad)?
            .split(',')
            .filter(|g| !g.is_empty())
            .map(|g| g.parse().map(Gid::from_raw).map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        let user = parts.next().ok_or_else(bad)?.to_string();
        Ok(Credentials {
            user,
            uid,
            gid,
            groups,
        })
    }
}

/// Becomes `creds` for good: setgroups, setgid, setuid, then verifies. Call in the worker,
/// before loading the app; only root may call it.
pub fn drop_privileges(creds: &Credentials) -> Result<(), PrivError> {
    let user = || creds.user.clone();
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return Err(PrivError::NotRoot {
            user: user(),
            euid: euid.as_raw(),
        });
    }
    let set = |step: &'static str| {
        move |source| PrivError::Set {
            user: user(),
            step,
            source,
        }
    };
    nix::unistd::setgroups(&creds.groups).map_err(set("setgroups"))?;
    nix::unistd::setgid(creds.gid).map_err(set("setgid"))?;
    nix::unistd::setuid(creds.uid).map_err(set("setuid"))?;
    verify(creds)
}

fn verify(creds: &Credentials) -> Result<(), PrivError> {
    let fail = |what: String| PrivError::Verify {
        user: creds.user.clone(),
        what,
    };
    let r = nix::unistd::getresuid().map_err(|e| fail(format!("getresuid failed: {e}")))?;
    if [r.real, r.effective, r.saved] != [creds.uid; 3] {
        return Err(fail(format!(
            "uids are {}/{}/{} (real/effective/saved), not {}",
            r.real, r.effective, r.saved, creds.uid
        )));
    }
    let g = nix::unistd::getresgid().map_err(|e| fail(format!("getresgid failed: {e}")))?;
    if [g.real, g.effective, g.saved] != [creds.gid; 3] {
        return Err(fail(format!(
            "gids are {}/{}/{} (real/effective/saved), not {}",
            g.real, g.effective, g.saved, creds.gid
        )));
    }
    let mut have = nix::unistd::getgroups().map_err(|e| fail(format!("getgroups failed: {e}")))?;
    let mut want = creds.groups.clone();
    have.sort_by_key(|g| g.as_raw());
    want.sort_by_key(|g| g.as_raw());
    have.dedup();
    want.dedup();
    if have != want {
        return Err(fail(format!("the groups are {have:?}, not {want:?}")));
    }
    if !creds.uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(fail("setuid(0) still succeeds".into()));
    }
    Ok(())
}

#[cfg(test)]
#[path = "privdrop_tests.rs"]
mod tests;
