//! `loss-matrix`: traffic shapes × operator events against the release build; prints the
//! markdown table of BENCHMARKS.md. See `angel_bench::matrix` for what is counted.
//!
//!     cargo build --release -p angel-host -p hello -p echo -p ticker -p axum-example -p angel-bench
//!     target/release/loss-matrix [--rolls 100] [--recycles 1000] [--max-requests 100]
//!         [--stream-max-requests 10] [--resizes 20] [--connections 32] [--h2-connections 4]
//!         [--h2-streams 10] [--only NAME]

use angel_bench::matrix::{self, Counts, Event, Libs, Traffic};
use angel_bench::server::sibling;

fn main() -> anyhow::Result<()> {
    let mut n = Counts {
        rolls: 100,
        recycles: 1000,
        max_requests: 100,
        resizes: 20,
        connections: 32,
        stream_max_requests: 10,
        h2_connections: 4,
        h2_streams: 10,
    };
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(k) = args.next() {
        let mut v = || -> anyhow::Result<u64> {
            Ok(args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))?
                .parse()?)
        };
        match k.as_str() {
            "--rolls" => n.rolls = v()? as usize,
            "--recycles" => n.recycles = v()? as usize,
            "--max-requests" => n.max_requests = v()?,
            "--resizes" => n.resizes = v()? as usize,
            "--connections" => n.connections = v()? as usize,
            "--stream-max-requests" => n.stream_max_requests = v()?,
            "--h2-connections" => n.h2_connections = v()? as usize,
            "--h2-streams" => n.h2_streams = v()? as usize,
            "--only" => only = args.next(),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let host_bin = sibling("angel-host");
    let libs = Libs {
        hello: sibling("libhello.so"),
        echo: sibling("libecho.so"),
        ticker: sibling("libticker.so"),
        axum: sibling("libaxum_example.so"),
    };
    let mut cells = Vec::new();
    for traffic in Traffic::ALL {
        for event in Event::ALL {
            let name = format!("{traffic:?}/{event:?}");
            if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
                continue;
            }
            let cell = matrix::run_cell(&host_bin, &libs, traffic, event, &n)?;
            eprintln!(
                "{name}: sent {} lost {} refused {} retried {} in {:.1} s {:?}",
                cell.sent,
                cell.lost_total(),
                cell.refused,
                cell.retried,
                cell.secs,
                cell.samples
            );
            cells.push(cell);
        }
    }
    print!("{}", matrix::table(&cells, &n));
    Ok(())
}
