//! Running wrk and reading its report.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::client::Failures;

/// What one wrk run measured.
#[derive(Debug, Clone, Default)]
pub struct WrkReport {
    pub rps: f64,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failures: Failures,
}

/// Whether a `wrk` binary is on the PATH.
pub fn available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("wrk"))
}

/// `wrk --latency -t threads -c connections -d secs http://addr/`, keep-alive or with
/// `Connection: close`.
pub fn run(
    addr: SocketAddr,
    threads: usize,
    connections: usize,
    duration: Duration,
    close: bool,
) -> anyhow::Result<WrkReport> {
    let mut cmd = Command::new("wrk");
    cmd.arg("--latency")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("5s");
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}/"));
    let out = cmd.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text).with_context(|| format!("parsing wrk's report:\n{text}"))
}

/// Parses wrk's text report (with `--latency`).
pub fn parse(text: &str) -> anyhow::Result<WrkReport> {
    let mut r = WrkReport::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => r.p50_ms = duration_ms(v)?,
            ["99%", v] => r.p99_ms = duration_ms(v)?,
            ["Requests/sec:", v] => r.rps = v.parse()?,
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.failures.status = n.parse()?,
            ["Socket", "errors:", ..] => {
                let nums: Vec<u64> = line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|s| s.parse().ok())
                    .collect();
                if let [connect, read, write, timeout] = nums[..] {
                    r.failures.connect = connect;
                    r.failures.read = read;
                    r.failures.write = write;
                    r.failures.timeout = timeout;
                }
            }
            _ => {}
        }
    }
    if r.requests == 0 {
        bail!("no requests in wrk's report");
    }
    Ok(r)
}

/// "812.00us", "1.20ms", "2.00s" → ms.
fn duration_ms(v: &str) -> anyhow::Result<f64> {
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("duration {v:?}"))?;
    Ok(match unit {
        "us" => num / 1000.0,
        "ms" => num,
        "s" => num * 1000.0,
        "m" => num * 60_000.0,
        _ => bail!("unknown unit in {v:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_wrk_report() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 64 connections\n  Latency Distribution\n     50%  612.00us\n     75%  1.00ms\n     90%    1.20ms\n     99%    3.10ms\n  400000 requests in 5.00s, 40.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 3\nRequests/sec:  80000.50\nTransfer/sec:      8.00MB\n";
        let r = parse(text).unwrap();
        assert_eq!(r.requests, 400_000);
        assert!((r.p50_ms - 0.612).abs() < 1e-9);
        assert!((r.p99_ms - 3.1).abs() < 1e-9);
        assert!((r.rps - 80000.5).abs() < 1e-9);
        assert_eq!(r.failures.total(), 6);
    }
}
