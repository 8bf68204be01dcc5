//! Parsing the master's seed-style log (`role[pid] message`) and process state.

/// Whether `pid` exists and is not a zombie.
pub fn pid_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the `(comm)` field, which may itself contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn parse_pid(s: &str) -> Option<i32> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Pids of `master[P] forked worker[W]` lines.
pub fn forked_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter_map(|l| {
            l.split_once(" forked worker[")
                .and_then(|(_, r)| parse_pid(r))
        })
        .collect()
}

/// Pids of `worker[W] listening on ...` lines (workers that reported ready), in order.
pub fn ready_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("worker[")?;
            let pid = parse_pid(rest)?;
            rest.contains("] listening on ").then_some(pid)
        })
        .collect()
}

/// Pids of `master[P] worker W exited` / `master[P] worker W died` lines.
pub fn ended_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter(|l| l.starts_with("master["))
        .filter_map(|l| {
            let (_, rest) = l.split_once("] worker ")?;
            let pid = parse_pid(rest)?;
            let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            (rest.starts_with(" exited") || rest.starts_with(" died")).then_some(pid)
        })
        .collect()
}

/// The pid in a worker line `worker[<pid>] ...` (e.g. the ticker app's ticks).
pub fn ticker_pid(line: &str) -> Option<i32> {
    let rest = line.strip_prefix("worker[")?;
    let pid = parse_pid(rest)?;
    rest.trim_start_matches(|c: char| c.is_ascii_digit())
        .starts_with(']')
        .then_some(pid)
}

/// N in `(generation N`.
pub fn generation_of(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once("(generation ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The hex after `sha ` in a `serving`/`reloaded` line.
pub fn sha_of(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("sha ")?;
    let sha: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    (!sha.is_empty()).then_some(sha)
}

/// The address in the master's first `master[P] listening on ADDR` line; panics with the log
/// if there is none.
pub fn listening_addr(log: &str) -> crate::Addr {
    log.lines()
        .filter(|l| l.starts_with("master["))
        .find_map(|l| {
            l.split_once("] listening on ")
                .and_then(|(_, a)| crate::Addr::parse(a))
        })
        .unwrap_or_else(|| panic!("no `master[P] listening on ADDR` line:\n{log}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Addr;

    const LOG: &str = "\
master[10] listening on 127.0.0.1:41234
master[10] created pid_file: /tmp/x/angel.pid
master[10] forked worker[11]
master[10] forked worker[12]
worker[11] listening on 127.0.0.1:41234
worker[12] listening on 127.0.0.1:41234
master[10] serving /tmp/libhello.so (generation 1, sha 1a2b3c4d, 2 workers)
master[10] worker 11 died (signal 6)
master[10] worker 12 exited
";

    #[test]
    fn log_parsers_read_the_seed_format() {
        assert_eq!(forked_pids(LOG), [11, 12]);
        assert_eq!(ready_pids(LOG), [11, 12]);
        assert_eq!(ended_pids(LOG), [11, 12]);
        assert_eq!(ticker_pid("worker[42] drained"), Some(42));
        assert_eq!(ticker_pid("master[10] forked worker[11]"), None);
        let serving = LOG.lines().nth(6).unwrap();
        assert_eq!(generation_of(serving), Some(1));
        assert_eq!(sha_of(serving).as_deref(), Some("1a2b3c4d"));
        assert_eq!(
            Addr::parse("unix:/a/b.sock"),
            Some(Addr::Unix("/a/b.sock".into()))
        );
    }
}
