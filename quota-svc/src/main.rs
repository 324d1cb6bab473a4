//! quota-svc binary: read the configuration from the environment and serve.

/// mimalloc instead of glibc's malloc: the allocator was the largest single cost of a
/// REST deduction (28% of the process's CPU, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use tokio_util::sync::CancellationToken;

const NAME: &str = "quota-svc";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    if let Err(error) = reeve_runtime::config::install(Default::default())
        .and_then(|()| reeve_runtime::telemetry::init(NAME))
    {
        eprintln!("quota-svc: configuration error: {error}");
        return std::process::ExitCode::from(2);
    }
    let config = match quota_svc::Config::from_env().and_then(|c| c.registry().map(|_| c)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("quota-svc: configuration error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    reeve_runtime::shutdown::cancel_on_signal(shutdown.clone());
    let result = async {
        quota_svc::start(config, shutdown)
            .await?
            .wait()
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    // Flush exported traces before the process ends.
    reeve_runtime::telemetry::shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("quota-svc: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
