//! Log output in the seed's style: one line per event on stderr, `role[pid] message`, e.g.
//! `master[3367] forked worker[3368]`. Structured fields, if any, follow as `key=value`.
//! Only the binary installs the subscriber; the modules just emit `tracing` events.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Which process is logging.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Master,
    Worker,
}

struct SeedFormat {
    prefix: String,
}

impl<S, N> FormatEvent<S, N> for SeedFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str(&self.prefix)?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the stderr logger for this process. Call once, first thing in `main`.
pub fn init(role: Role) {
    let name = match role {
        Role::Master => "master",
        Role::Worker => "worker",
    };
    let prefix = format!("{name}[{}] ", std::process::id());
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .event_format(SeedFormat { prefix })
        .try_init();
}
