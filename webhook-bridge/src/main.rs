//! webhook-bridge binary: read the configuration from the environment and serve.

/// mimalloc instead of glibc's malloc: the allocator was the largest single cost of a
/// REST deduction (28% of the process's CPU, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use tokio_util::sync::CancellationToken;

const NAME: &str = "webhook-bridge";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    if let Err(error) = reeve_runtime::config::install(Default::default())
        .and_then(|()| reeve_runtime::telemetry::init(NAME))
    {
        eprintln!("webhook-bridge: configuration error: {error}");
        return std::process::ExitCode::from(2);
    }
    let config = match webhook_bridge::Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("webhook-bridge: configuration error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    reeve_runtime::shutdown::cancel_on_signal(shutdown.clone());
    let reconcile = match webhook_bridge::stripe::reconcile::Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("webhook-bridge: configuration error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = async {
        let bridge = webhook_bridge::start(config, shutdown.clone()).await?;
        if let Some(settings) = reconcile {
            bridge.spawn_reconciler(settings, shutdown)?;
        }
        bridge.wait().await
    }
    .await;
    // Flush exported traces before the process ends.
    reeve_runtime::telemetry::shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("webhook-bridge: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
