//! Logging set-up: `RUST_LOG` filters; JSON lines when `REEVE_LOG_FORMAT=json`,
//! human-readable text otherwise. Call once per process.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("REEVE_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A second call (e.g. two servers in one test process) keeps the first subscriber.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
