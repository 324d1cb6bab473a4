//! Telemetry of every Reeve process, set up once: logs (`tracing`, JSON lines in
//! production, pretty text in dev, filtered by `RUST_LOG`), traces exported over OTLP
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (W3C trace context carried across gRPC),
//! and Prometheus metrics rendered at `/metrics`, whose memory stays bounded whether or
//! not anything scrapes it.
//!
//! Nothing here logs a request body, a header value or a configuration value: tokens
//! and secrets never reach a log line or a span.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{self, ConfigError};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable text (dev, `reeve up`).
    Pretty,
}

static TRACER_PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets (seconds) of every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Sets up logs, traces and metrics for a production binary (JSON logs by default).
pub fn init(service_name: &'static str) -> Result<(), ConfigError> {
    init_with(service_name, LogFormat::Json)
}

/// Sets up logs, traces and metrics; `REEVE_LOG_FORMAT` (json | pretty) overrides
/// `default_format`. A second call in one process keeps the first set-up.
pub fn init_with(service_name: &'static str, default_format: LogFormat) -> Result<(), ConfigError> {
    let format = match config::var("REEVE_LOG_FORMAT")?.as_deref().map(str::trim) {
        None => default_format,
        Some(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
        Some(v) if v.eq_ignore_ascii_case("pretty") || v.eq_ignore_ascii_case("text") => {
            LogFormat::Pretty
        }
        Some(_) => {
            return Err(ConfigError::new(
                "REEVE_LOG_FORMAT",
                "must be json or pretty",
            ));
        }
    };
    let filter = match config::var("RUST_LOG")? {
        None => EnvFilter::new("info"),
        Some(directives) => EnvFilter::try_new(directives.trim())
            .map_err(|e| ConfigError::new("RUST_LOG", format!("is not a valid log filter: {e}")))?,
    };
    let otel = match config::var("OTEL_EXPORTER_OTLP_ENDPOINT")? {
        None => None,
        Some(endpoint) => {
            let endpoint = endpoint.trim().to_owned();
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "must be an http:// or https:// URL",
                ));
            }
            let name = config::var("OTEL_SERVICE_NAME")?.unwrap_or_else(|| service_name.to_owned());
            let provider = tracer_provider(&endpoint, name)?;
            let tracer = provider.tracer(service_name);
            let _ = TRACER_PROVIDER.set(provider.clone());
            opentelemetry::global::set_tracer_provider(provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let json = format == LogFormat::Json;
    // Logs go to stderr; stdout is left to what a command prints for its user.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr)
        }))
        .with((!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
        }))
        .with(otel)
        .try_init();
    // A second set-up in one process (tests, `reeve up`) keeps the first subscriber.
    drop(result);
    metrics();
    Ok(())
}

fn tracer_provider(endpoint: &str, service_name: String) -> Result<SdkTracerProvider, ConfigError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| {
            ConfigError::new(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("cannot build the OTLP exporter: {e}"),
            )
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Flushes and stops trace export (call once, at exit).
pub fn shutdown() {
    if let Some(provider) = TRACER_PROVIDER.get()
        && let Err(error) = provider.shutdown()
    {
        tracing::warn!(%error, "trace export did not shut down cleanly");
    }
}

/// The process-wide Prometheus registry (installed as the `metrics` recorder on first
/// use).
pub fn metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = builder
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed: keep a private one so rendering still works.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        };
        spawn_upkeep(handle.clone());
        handle
    })
}

/// How often histogram samples are folded into their buckets.
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The exporter keeps every histogram sample until it is folded into the buckets,
/// which happens on a scrape or an upkeep. Without a scraper that would be never, and
/// memory would grow with every request; this thread folds them every
/// [`METRICS_UPKEEP_INTERVAL`], so what is held is bounded by the samples of one
/// interval. A thread, not a task: the recorder may be created outside a runtime and
/// must outlive any one runtime (tests start many).
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the metrics upkeep thread");
    }
}

/// The Prometheus text exposition of every metric of this process.
pub fn render_metrics() -> String {
    metrics().render()
}

/// Writes the current span's W3C trace context (`traceparent`, `tracestate`) into
/// outgoing gRPC metadata.
pub fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);
    impl Injector for MetadataInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                tonic::metadata::MetadataValue::try_from(value),
            ) {
                self.0.insert(key, value);
            }
        }
    }
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// Makes `span` a child of the W3C trace context carried by incoming `headers`, if any.
pub fn adopt_trace_context(span: &tracing::Span, headers: &http::HeaderMap) {
    struct HeaderExtractor<'a>(&'a http::HeaderMap);
    impl Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }
    if headers.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(parent);
    }
}

/// Connections of a database pool, for the `reeve_db_pool_connections` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub open: u32,
    pub idle: usize,
}

/// Samples a pool every few seconds into `reeve_db_pool_connections{service, state}`
/// (state `in_use` or `idle`) until `shutdown` is cancelled.
pub fn sample_pool(
    service: &'static str,
    shutdown: tokio_util::sync::CancellationToken,
    stats: impl Fn() -> PoolStats + Send + 'static,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let PoolStats { open, idle } = stats();
            let in_use = f64::from(open) - idle as f64;
            metrics::gauge!("reeve_db_pool_connections", "service" => service, "state" => "in_use")
                .set(in_use.max(0.0));
            metrics::gauge!("reeve_db_pool_connections", "service" => service, "state" => "idle")
                .set(idle as f64);
        }
    });
}
