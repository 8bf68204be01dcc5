//! The results of a run as a markdown table (results.md) and `key=value` lines (summary.txt).

use std::fmt::Write as _;

use crate::ab::{Balance, Memory, Round};
use crate::rolls::{EventRun, RollLatency};
use crate::stats::{median, quantile};

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Results {
    pub profile: String,
    pub machine: String,
    pub command: String,
    pub load_gen: String,
    pub workers: usize,
    pub connections: usize,
    pub ab: Vec<Round>,
    pub roll_ab: Vec<Round>,
    pub roll_interval_ms: u128,
    pub balance_angel: Balance,
    pub balance_plain: Balance,
    pub memory: Memory,
    pub roll_runs: Vec<EventRun>,
    pub idle: Vec<RollLatency>,
    pub recycle_runs: Vec<EventRun>,
    pub max_requests: u64,
}

/// p50 and p99 of the present values, and how many there were.
fn p50_p99(values: impl Iterator<Item = Option<f64>>) -> (Option<f64>, Option<f64>, usize) {
    let v: Vec<f64> = values.flatten().collect();
    (quantile(&v, 0.5), quantile(&v, 0.99), v.len())
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1}"))
}

fn fmt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"))
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**no**"
    }
}

struct AbSummary {
    angel_rps: f64,
    plain_rps: f64,
    ratio: f64,
    angel_p50: f64,
    angel_p99: f64,
    plain_p50: f64,
    plain_p99: f64,
    /// Server CPU µs per request (median; 0 when not measured).
    angel_cpu: f64,
    plain_cpu: f64,
    angel_failed: u64,
    hups: usize,
    /// Against the minimal reference (0 when it did not run): its req/s and CPU µs per
    /// request, and the medians of the per-round angel/minimal ratios of both.
    minimal_rps: f64,
    minimal_cpu: f64,
    ratio_minimal: f64,
    cpu_ratio_minimal: f64,
    /// Median of the per-round angel/plain CPU ratios.
    cpu_ratio_plain: f64,
}

fn summarize(rounds: &[Round]) -> AbSummary {
    let col = |f: fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    AbSummary {
        angel_rps: col(|r| r.angel.rps),
        plain_rps: col(|r| r.plain.rps),
        // The median of the per-round ratios: each pair ran back to back.
        ratio: col(|r| r.angel.rps / r.plain.rps.max(1.0)),
        angel_p50: col(|r| r.angel.p50_ms),
        angel_p99: col(|r| r.angel.p99_ms),
        plain_p50: col(|r| r.plain.p50_ms),
        plain_p99: col(|r| r.plain.p99_ms),
        angel_cpu: col(|r| r.angel.cpu_us_per_request.unwrap_or(f64::NAN)),
        plain_cpu: col(|r| r.plain.cpu_us_per_request.unwrap_or(f64::NAN)),
        angel_failed: rounds.iter().map(|r| r.angel.failures.total()).sum(),
        hups: rounds.iter().map(|r| r.hups).sum(),
        minimal_rps: col(|r| r.minimal.as_ref().map_or(f64::NAN, |m| m.rps)),
        minimal_cpu: col(|r| {
            r.minimal
                .as_ref()
                .and_then(|m| m.cpu_us_per_request)
                .unwrap_or(f64::NAN)
        }),
        ratio_minimal: col(|r| {
            r.minimal
                .as_ref()
                .map_or(f64::NAN, |m| r.angel.rps / m.rps.max(1.0))
        }),
        cpu_ratio_minimal: col(|r| {
            match (
                r.angel.cpu_us_per_request,
                r.minimal.as_ref().and_then(|m| m.cpu_us_per_request),
            ) {
                (Some(a), Some(m)) => a / m,
                _ => f64::NAN,
            }
        }),
        cpu_ratio_plain: col(
            |r| match (r.angel.cpu_us_per_request, r.plain.cpu_us_per_request) {
                (Some(a), Some(p)) => a / p,
                _ => f64::NAN,
            },
        ),
    }
}

impl Results {
    /// The results table and the details, in markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Profile `{}`, {} workers vs {} plain processes, {} connections, A/B load generator: {}.", self.profile, self.workers, self.workers, self.connections, self.load_gen);
        let _ = writeln!(s, "Machine: {}. The load generator runs on the same machine and shares its cores with the servers.\n", self.machine);
        let _ = writeln!(s, "| measure | angel-host | plain hyper | target | met |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        if !self.ab.is_empty() {
            let a = summarize(&self.ab);
            let _ = writeln!(s, "| throughput, keep-alive (median of {} interleaved rounds) | {:.0} req/s | {:.0} req/s | ratio ≥ 0.97: **{:.3}** | {} |", self.ab.len(), a.angel_rps, a.plain_rps, a.ratio, yes(a.ratio >= 0.97));
            let _ = writeln!(
                s,
                "| latency p50 / p99 | {:.2} / {:.2} ms | {:.2} / {:.2} ms | — | |",
                a.angel_p50, a.angel_p99, a.plain_p50, a.plain_p99
            );
            let _ = writeln!(
                s,
                "| server CPU per request (all processes, median) | {:.2} µs | {:.2} µs | — ({:+.1} %) | |",
                a.angel_cpu,
                a.plain_cpu,
                (a.angel_cpu / a.plain_cpu - 1.0) * 100.0
            );
            if a.minimal_rps > 0.0 {
                let _ = writeln!(s, "| vs the minimal hyper `http1` server (median of per-round ratios): throughput | {:.0} req/s | minimal {:.0} req/s | ratio ≥ 0.97: **{:.3}** | {} |", a.angel_rps, a.minimal_rps, a.ratio_minimal, yes(a.ratio_minimal >= 0.97));
                let _ = writeln!(s, "| vs the minimal hyper `http1` server: server CPU per request | {:.2} µs | minimal {:.2} µs | ≤ 1.03×: **{:.3}×** (vs plain hyper {:.3}×) | {} |", a.angel_cpu, a.minimal_cpu, a.cpu_ratio_minimal, a.cpu_ratio_plain, yes(a.cpu_ratio_minimal <= 1.03));
            }
        }
        if !self.roll_ab.is_empty() {
            let a = summarize(&self.roll_ab);
            let _ = writeln!(s, "| throughput under a HUP every {} ms ({} HUPs; plain steady) | {:.0} req/s | {:.0} req/s | ratio ≥ 0.97: **{:.3}** | {} |", self.roll_interval_ms, a.hups, a.angel_rps, a.plain_rps, a.ratio, yes(a.ratio >= 0.97));
            let _ = writeln!(
                s,
                "| latency p50 / p99 under that roll | {:.2} / {:.2} ms | {:.2} / {:.2} ms | — | |",
                a.angel_p50, a.angel_p99, a.plain_p50, a.plain_p99
            );
            let _ = writeln!(
                s,
                "| failed requests of the A/B generator across those {} HUPs | {} | — | 0 | {} |",
                a.hups,
                a.angel_failed,
                yes(a.angel_failed == 0)
            );
        }
        for run in &self.roll_runs {
            let (r50, r99, n) = p50_p99(run.rolls.iter().map(|r| r.ready_ms));
            let (f50, f99, fnum) = p50_p99(run.rolls.iter().map(|r| r.first_ms));
            let ok = r50.is_some_and(|v| v <= 10.0) && r99.is_some_and(|v| v <= 30.0);
            let _ = writeln!(s, "| roll under {} load: HUP → all new workers ready, p50 / p99 ({n} rolls) | {} / {} ms | — | ≤ 10 / ≤ 30 ms | {} |", run.label(), fmt_ms(r50), fmt_ms(r99), yes(ok));
            let _ = writeln!(s, "| roll under {} load: HUP → first response from the new generation, p50 / p99 ({fnum} rolls) | {} / {} ms | — | — | |", run.label(), fmt_ms(f50), fmt_ms(f99));
        }
        if !self.idle.is_empty() {
            let (r50, r99, n) = p50_p99(self.idle.iter().map(|r| r.ready_ms));
            let (f50, f99, _) = p50_p99(self.idle.iter().map(|r| r.first_ms));
            let ok = r50.is_some_and(|v| v <= 10.0) && r99.is_some_and(|v| v <= 30.0);
            let _ = writeln!(s, "| idle roll: HUP → all new workers ready, p50 / p99 ({n} rolls) | {} / {} ms | — | ≤ 10 / ≤ 30 ms | {} |", fmt_ms(r50), fmt_ms(r99), yes(ok));
            let _ = writeln!(s, "| idle roll: HUP → first response from the new generation, p50 / p99 | {} / {} ms | — | — | |", fmt_ms(f50), fmt_ms(f99));
        }
        for run in &self.roll_runs {
            let rolls = run.rolls.iter().filter(|r| r.ready_ms.is_some()).count();
            let _ = writeln!(s, "| failed requests across {rolls} rolls, {} client ({} ok, {:.0} req/s, latency p99 / max {:.1} / {:.1} ms) | {} | — | 0 | {} |", run.label(), run.load.ok, run.load.rps(), run.load.latency_ms(0.99), run.load.latency_ms(1.0), run.load.failures, yes(run.load.failures.total() == 0 && run.problems.is_empty()));
        }
        for run in &self.recycle_runs {
            let _ = writeln!(s, "| failed requests across {} recycles (`--max-requests {}`), {} client ({} ok, {:.0} req/s, latency p99 / max {:.1} / {:.1} ms) | {} | — | 0 | {} |", run.events.len(), self.max_requests, run.label(), run.load.ok, run.load.rps(), run.load.latency_ms(0.99), run.load.latency_ms(1.0), run.load.failures, yes(run.load.failures.total() == 0));
        }
        if !self.balance_angel.per_worker.is_empty() {
            let ok = self.balance_angel.ratio() <= 1.3;
            let _ = writeln!(s, "| balance: connections per worker, max/min (close client) | {:.2} ({:?}) | {:.2} ({:?}) | ≤ 1.3 | {} |", self.balance_angel.ratio(), self.balance_angel.per_worker, self.balance_plain.ratio(), self.balance_plain.per_worker, yes(ok));
        }
        let m = &self.memory;
        let _ = writeln!(
            s,
            "| master RSS (anon + file) | {:.2} MB ({} + {} KiB) | parent {:.2} MB | ≤ 3 MB | {} |",
            m.master.mib(),
            m.master.anon_kib,
            m.master.file_kib,
            m.plain_parent.mib(),
            yes(m.master.mib() <= 3.0)
        );
        let diff = m.worker.mib() - m.plain.mib();
        let _ = writeln!(s, "| worker RSS, mean (anon + file) | {:.2} MB ({} + {} KiB) | {:.2} MB ({} + {} KiB) | ≤ plain + 0.5 MB: **{diff:+.2} MB** | {} |", m.worker.mib(), m.worker.anon_kib, m.worker.file_kib, m.plain.mib(), m.plain.anon_kib, m.plain.file_kib, yes(diff <= 0.5));
        let _ = writeln!(
            s,
            "| PSS / USS (private): master | {} / {} KiB | parent {} / {} KiB | — | |",
            m.master.pss_kib, m.master.uss_kib, m.plain_parent.pss_kib, m.plain_parent.uss_kib
        );
        let _ = writeln!(
            s,
            "| PSS / USS (private): worker, mean | {} / {} KiB | {} / {} KiB | — | |",
            m.worker.pss_kib, m.worker.uss_kib, m.plain.pss_kib, m.plain.uss_kib
        );
        self.details(&mut s);
        s
    }

    fn details(&self, s: &mut String) {
        for (name, rounds) in [("steady", &self.ab), ("angel under roll", &self.roll_ab)] {
            if rounds.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\nA/B rounds, {name} (req/s, p50/p99 ms):\n");
            let _ = writeln!(
                s,
                "| round | plain hyper | angel-host | ratio | CPU µs/request plain / angel | minimal http1 req/s, CPU µs/request |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|");
            for (i, r) in rounds.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "| {} | {:.0} ({:.2}/{:.2}) | {:.0} ({:.2}/{:.2}) | {:.3} | {} / {} | {} |",
                    i + 1,
                    r.plain.rps,
                    r.plain.p50_ms,
                    r.plain.p99_ms,
                    r.angel.rps,
                    r.angel.p50_ms,
                    r.angel.p99_ms,
                    r.angel.rps / r.plain.rps.max(1.0),
                    fmt_us(r.plain.cpu_us_per_request),
                    fmt_us(r.angel.cpu_us_per_request),
                    r.minimal.as_ref().map_or_else(
                        || "—".to_owned(),
                        |m| format!("{:.0}, {}", m.rps, fmt_us(m.cpu_us_per_request))
                    )
                );
            }
        }
        let problems: Vec<&String> = self
            .roll_runs
            .iter()
            .chain(&self.recycle_runs)
            .flat_map(|r| &r.problems)
            .collect();
        let samples: Vec<&String> = self
            .roll_runs
            .iter()
            .chain(&self.recycle_runs)
            .flat_map(|r| &r.load.samples)
            .collect();
        if !problems.is_empty() || !samples.is_empty() {
            let _ = writeln!(s, "\nProblems seen:\n");
            for p in problems.iter().chain(&samples).take(20) {
                let _ = writeln!(s, "- `{p}`");
            }
        }
    }

    /// `key=value` lines for scripts and the smoke test.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if !self.ab.is_empty() {
            let a = summarize(&self.ab);
            let _ = writeln!(
                s,
                "ab_angel_rps={:.0}\nab_plain_rps={:.0}\nab_ratio={:.3}\nab_angel_failed={}",
                a.angel_rps, a.plain_rps, a.ratio, a.angel_failed
            );
            let _ = writeln!(
                s,
                "ab_minimal_rps={:.0}\nab_ratio_minimal={:.3}\nab_angel_cpu_us={:.3}\nab_plain_cpu_us={:.3}\nab_minimal_cpu_us={:.3}\nab_cpu_ratio_minimal={:.3}\nab_cpu_ratio_plain={:.3}",
                a.minimal_rps,
                a.ratio_minimal,
                a.angel_cpu,
                a.plain_cpu,
                a.minimal_cpu,
                a.cpu_ratio_minimal,
                a.cpu_ratio_plain
            );
        }
        for run in &self.roll_runs {
            let m = match run.rate {
                Some(_) => "paced".to_owned(),
                None => run.mode.label().replace('-', ""),
            };
            let (r50, r99, _) = p50_p99(run.rolls.iter().map(|r| r.ready_ms));
            let rolls = run.rolls.iter().filter(|r| r.ready_ms.is_some()).count();
            let _ = writeln!(s, "roll_{m}_rolls={rolls}\nroll_{m}_ok={}\nroll_{m}_failed={}\nroll_{m}_problems={}\nroll_{m}_ready_p50_ms={}\nroll_{m}_ready_p99_ms={}", run.load.ok, run.load.failures.total(), run.problems.len(), fmt_ms(r50), fmt_ms(r99));
        }
        let (r50, _, n) = p50_p99(self.idle.iter().map(|r| r.ready_ms));
        let _ = writeln!(s, "idle_rolls={n}\nidle_ready_p50_ms={}", fmt_ms(r50));
        for run in &self.recycle_runs {
            let m = run.mode.label().replace('-', "");
            let _ = writeln!(
                s,
                "recycle_{m}_recycles={}\nrecycle_{m}_ok={}\nrecycle_{m}_failed={}",
                run.events.len(),
                run.load.ok,
                run.load.failures.total()
            );
        }
        let _ = writeln!(
            s,
            "balance_ratio={:.3}\nmaster_rss_kib={}\nworker_rss_kib={}\nplain_rss_kib={}\nworker_uss_kib={}\nplain_uss_kib={}",
            self.balance_angel.ratio(),
            self.memory.master.total_kib,
            self.memory.worker.total_kib,
            self.memory.plain.total_kib,
            self.memory.worker.uss_kib,
            self.memory.plain.uss_kib
        );
        s
    }
}
