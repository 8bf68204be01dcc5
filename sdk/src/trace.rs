//! `tracing` in the app, printed by the host.
//!
//! An app's cdylib holds its own copy of `tracing`, which without a subscriber drops every
//! event. At entry the SDK installs one (a `tracing-subscriber` registry with an [`EnvFilter`]
//! and [`HostLayer`]) that sends each event across the ABI as an [`abi::LogRecord`]: level,
//! target, message, its fields and its spans' names and fields as JSON. The host prints it in
//! its own format: `worker[pid] message key=value …`, or with `--log-format json` the fields
//! under `"fields"` and `"target"` / `"spans"` beside them. `log`-crate records are bridged in
//! through `tracing-log`.
//!
//! [`LOG_ENV`] (`ANGEL_LOG`, `RUST_LOG` syntax, default `info`) filters in the app, before
//! anything crosses. An app that set its own global subscriber before angel's entry keeps it
//! (one warning); an app that wants to install its own in its main builds angel without the
//! `tracing` feature.

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

use crate::abi;

/// The environment variable with the app's `tracing` filter, in `RUST_LOG` syntax
/// (`info`, `axum_example=debug,tower_http=info`, ...). Default: `info`.
pub const LOG_ENV: &str = "ANGEL_LOG";

/// Installs the forwarding subscriber as the global default, once per process. Keeps a
/// subscriber the app installed first, with one warning.
pub(crate) fn install() {
    // One entry call per worker process; in-process tests call `run` more than once.
    static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if INSTALLED.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    if tracing::dispatcher::has_been_set() {
        crate::warn!(
            "a global tracing subscriber is already installed; keeping it (angel does not \
             forward tracing events to the host log)"
        );
        return;
    }
    let filter = filter(std::env::var(LOG_ENV).ok().as_deref());
    let subscriber = tracing_subscriber::registry().with(filter).with(HostLayer);
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        // Lost a race with another thread of the app: theirs stays.
        crate::warn!("a global tracing subscriber was installed meanwhile; keeping it");
        return;
    }
    if tracing_log::LogTracer::init().is_err() {
        crate::warn!("a `log` logger is already installed; `log` records do not reach tracing");
    }
}

/// The filter for `spec` (the value of [`LOG_ENV`]); a bad spec is logged and replaced by the
/// default.
fn filter(spec: Option<&str>) -> EnvFilter {
    let default = || {
        EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse_lossy("")
    };
    match spec.map(str::trim) {
        None | Some("") => default(),
        Some(spec) => EnvFilter::builder().parse(spec).unwrap_or_else(|e| {
            crate::warn!("{LOG_ENV}={spec:?} is not a valid filter ({e}); using `info`");
            default()
        }),
    }
}

/// The layer that formats each event and hands it to the host.
#[derive(Debug, Clone, Copy)]
pub struct HostLayer;

/// A span's fields, kept in its extensions.
struct SpanFields(Map<String, Value>);

impl<S> Layer<S> for HostLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = JsonFields::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(SpanFields(fields.fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(map)) = extensions.get_mut::<SpanFields>() {
            let mut fields = JsonFields {
                fields: std::mem::take(map),
                message: None,
            };
            values.record(&mut fields);
            *map = fields.fields;
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // `log` records come in with the `log` crate's metadata in `log.*` fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let spans: Vec<Value> = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .map(|span| {
                        let mut obj = Map::new();
                        obj.insert("name".into(), Value::from(span.name()));
                        if let Some(SpanFields(map)) = span.extensions().get::<SpanFields>() {
                            obj.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
                        }
                        Value::Object(obj)
                    })
                    .collect()
            })
            .unwrap_or_default();
        send(
            level(meta.level()),
            meta.target(),
            fields.message.as_deref().unwrap_or_default(),
            &fields.fields,
            &spans,
        );
    }
}

fn level(level: &Level) -> u32 {
    match *level {
        Level::ERROR => abi::LOG_ERROR,
        Level::WARN => abi::LOG_WARN,
        Level::INFO => abi::LOG_INFO,
        Level::DEBUG => abi::LOG_DEBUG,
        Level::TRACE => abi::LOG_TRACE,
    }
}

/// Sends one record; to a host without `log_record` (ABI 1.0) as a plain line
/// `message key=value …`.
fn send(level: u32, target: &str, message: &str, fields: &Map<String, Value>, spans: &[Value]) {
    let fields_json = if fields.is_empty() {
        String::new()
    } else {
        Value::Object(fields.clone()).to_string()
    };
    let spans_json = if spans.is_empty() {
        String::new()
    } else {
        Value::Array(spans.to_vec()).to_string()
    };
    let record = abi::LogRecord {
        size: std::mem::size_of::<abi::LogRecord>() as u32,
        level,
        target: target.as_ptr().cast(),
        target_len: target.len(),
        message: message.as_ptr().cast(),
        message_len: message.len(),
        fields: fields_json.as_ptr().cast(),
        fields_len: fields_json.len(),
        spans: spans_json.as_ptr().cast(),
        spans_len: spans_json.len(),
    };
    if crate::host::current().is_some_and(|shared| shared.log_record(&record)) {
        return;
    }
    let mut line = message.to_owned();
    for (key, value) in fields {
        line.push(' ');
        line.push_str(key);
        line.push('=');
        match value {
            Value::String(s) => line.push_str(s),
            other => line.push_str(&other.to_string()),
        }
    }
    crate::host::log(level.min(abi::LOG_DEBUG), &line);
}

/// Collects fields as JSON values; the `message` field separately.
#[derive(Default)]
struct JsonFields {
    fields: Map<String, Value>,
    message: Option<String>,
}

impl JsonFields {
    fn insert(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "message" {
            self.message = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
        } else if !name.starts_with("log.") {
            self.fields.insert(name.to_owned(), value);
        }
    }
}

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, Value::from(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.insert(field, Value::from(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_rust_log_syntax_and_fall_back_to_info() {
        assert_eq!(filter(None).max_level_hint(), Some(LevelFilter::INFO));
        assert_eq!(filter(Some("")).max_level_hint(), Some(LevelFilter::INFO));
        assert_eq!(
            filter(Some("warn,my_app=debug")).max_level_hint(),
            Some(LevelFilter::DEBUG)
        );
        assert_eq!(
            filter(Some("error")).max_level_hint(),
            Some(LevelFilter::ERROR)
        );
        assert_eq!(
            filter(Some("not a [valid filter")).max_level_hint(),
            Some(LevelFilter::INFO)
        );
    }

    #[test]
    fn an_app_subscriber_installed_first_is_kept() {
        // The only test in this binary that touches the global dispatcher.
        let collected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
        impl<S: Subscriber> Layer<S> for Count {
            fn on_event(&self, _event: &Event<'_>, _ctx: Context<'_, S>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let mine = tracing_subscriber::registry().with(Count(collected.clone()));
        tracing::subscriber::set_global_default(mine).unwrap();
        install(); // no panic, one warning
        tracing::info!("still mine");
        assert_eq!(collected.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
