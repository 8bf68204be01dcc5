//! Log output, one line per event on stderr, in one of two formats:
//!
//! - **seed** (default), the style of angel.js: `master[3367] forked worker[3368]`;
//! - **json** (`--log-format json`): one object per line,
//!   `{"ts":"2026-11-28T12:00:00.123Z","level":"info","role":"master","pid":3367,
//!   "generation":2,"event":"forked","msg":"forked worker[3368]","fields":{"worker":3368}}`.
//!
//! Events carry an `event` field (a stable name for machines) and, where it matters, a
//! `generation`; other structured fields go under `fields`. Only the binary installs the
//! subscriber; the modules just emit `tracing` events.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::cli::LogFormat;

/// Which process is logging.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Master,
    /// A worker, with its generation.
    Worker(u64),
}

struct Formatter {
    format: LogFormat,
    role: &'static str,
}

/// A worker's generation as its JSON lines carry it (0: none, the master; or a spare probe
/// that has no generation yet, see [`set_generation`]).
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// In a spare probe handed its generation's snapshot: carry that generation from now on.
pub fn set_generation(generation: u64) {
    GENERATION.store(generation, Ordering::Relaxed);
}

/// This process's pid as its log lines print it: set at [`init`], and again by
/// [`after_fork`] in a worker forked from its generation's zygote.
static PID: AtomicU32 = AtomicU32::new(0);

/// In a process forked after [`init`]: print its own pid from now on.
pub fn after_fork() {
    PID.store(std::process::id(), Ordering::Relaxed);
}

/// Collects an event's fields.
#[derive(Default)]
struct Fields {
    message: String,
    event: Option<String>,
    generation: Option<u64>,
    other: Map<String, Value>,
    /// A structured record from the app (`worker::host_log_record`): its target, its fields
    /// (a JSON object) and its spans (a JSON array of `{"name":..., fields...}`).
    app_target: Option<String>,
    app_fields: Map<String, Value>,
    app_spans: Vec<Value>,
}

impl Fields {
    /// The app record's fields, then its spans' fields (innermost first), as ` key=value`.
    fn app_key_values(&self) -> String {
        let mut out = String::new();
        let span_fields = self.app_spans.iter().rev().filter_map(Value::as_object);
        for (key, value) in self
            .app_fields
            .iter()
            .chain(span_fields.flat_map(|s| s.iter().filter(|(k, _)| *k != "name")))
        {
            let _ = match value {
                Value::String(s) if !s.is_empty() && !s.contains([' ', '"', '=']) => {
                    write!(out, " {key}={s}")
                }
                Value::String(s) => write!(out, " {key}={s:?}"),
                other => write!(out, " {key}={other}"),
            };
        }
        out
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "event" => self.event = Some(value.to_string()),
            "app_target" if !value.is_empty() => self.app_target = Some(value.to_string()),
            "app_fields" => {
                if let Ok(Value::Object(map)) = serde_json::from_str(value) {
                    self.app_fields = map;
                }
            }
            "app_spans" => {
                if let Ok(Value::Array(spans)) = serde_json::from_str(value) {
                    self.app_spans = spans;
                }
            }
            "app_target" => {}
            name => {
                self.other.insert(name.into(), Value::from(value));
            }
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "generation" => self.generation = Some(value),
            name => {
                self.other.insert(name.into(), Value::from(value));
            }
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        match field.name() {
            "generation" => self.generation = u64::try_from(value).ok(),
            name => {
                self.other.insert(name.into(), Value::from(value));
            }
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.other.insert(field.name().into(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.other.insert(field.name().into(), Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }
}

impl<S, N> FormatEvent<S, N> for Formatter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        match self.format {
            LogFormat::Seed => writeln!(
                writer,
                "{}[{}] {}{}",
                self.role,
                PID.load(Ordering::Relaxed),
                fields.message,
                fields.app_key_values()
            ),
            LogFormat::Json => {
                let mut obj = Map::new();
                obj.insert("ts".into(), Value::from(rfc3339_now()));
                obj.insert(
                    "level".into(),
                    Value::from(level_name(event.metadata().level())),
                );
                obj.insert("role".into(), Value::from(self.role));
                obj.insert("pid".into(), Value::from(PID.load(Ordering::Relaxed)));
                let own = Some(GENERATION.load(Ordering::Relaxed)).filter(|g| *g != 0);
                if let Some(g) = fields.generation.or(own) {
                    obj.insert("generation".into(), Value::from(g));
                }
                obj.insert(
                    "event".into(),
                    Value::from(fields.event.unwrap_or_else(|| "log".into())),
                );
                obj.insert("msg".into(), Value::from(fields.message));
                if let Some(target) = fields.app_target {
                    obj.insert("target".into(), Value::from(target));
                }
                if !fields.app_spans.is_empty() {
                    obj.insert("spans".into(), Value::Array(fields.app_spans));
                }
                let mut other = fields.other;
                other.extend(fields.app_fields);
                obj.insert("fields".into(), Value::Object(other));
                writeln!(writer, "{}", Value::Object(obj))
            }
        }
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// `2026-11-28T12:00:00.123Z` without a date-time dependency (civil-from-days, H. Hinnant).
fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

pub(crate) fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::with_capacity(24);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        tod / 3600,
        (tod % 3600) / 60,
        tod % 60
    );
    out
}

/// Installs the stderr logger for this process. Call once, first thing in `main`.
pub fn init(role: Role, format: LogFormat) {
    PID.store(std::process::id(), Ordering::Relaxed);
    let name = match role {
        Role::Master => "master",
        Role::Worker(g) => {
            GENERATION.store(g, Ordering::Relaxed);
            "worker"
        }
    };
    // A worker prints every level: the only debug and trace events it has are the app's,
    // which the app already filtered (ANGEL_LOG).
    let max_level = match role {
        Role::Master => tracing::level_filters::LevelFilter::INFO,
        Role::Worker(_) => tracing::level_filters::LevelFilter::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(max_level)
        .with_writer(std::io::stderr)
        .event_format(Formatter { format, role: name })
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_fields_print_after_the_message_then_span_fields_innermost_first() {
        let fields = Fields {
            app_fields: serde_json::from_str(r#"{"n":1,"name":"a b","ok":true,"word":"x"}"#)
                .expect("fields JSON"),
            app_spans: serde_json::from_str(
                r#"[{"name":"outer","o":"1"},{"name":"request","method":"GET","empty":""}]"#,
            )
            .expect("spans JSON"),
            ..Fields::default()
        };
        assert_eq!(
            fields.app_key_values(),
            r#" n=1 name="a b" ok=true word=x empty="" method=GET o=1"#
        );
        assert_eq!(Fields::default().app_key_values(), "");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_795_867_200, 123), "2026-11-28T12:00:00.123Z");
    }
}
