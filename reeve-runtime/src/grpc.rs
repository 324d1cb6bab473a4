//! Serving one Reeve gRPC service the same way everywhere: health
//! (`grpc.health.v1.Health`) and reflection (v1 and v1alpha) beside it, Prometheus
//! metrics at `GET /metrics` (HTTP/1.1 on the same port), a span and metrics per call
//! (parented on the caller's W3C trace context), TCP_NODELAY on accepted sockets, the
//! connection limits of [`crate::connections`] (a cap, header and idle deadlines, the
//! descriptor limit raised), and a graceful stop that turns health NOT_SERVING first and
//! then drains in-flight calls.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::Instrument;

use crate::connections::{GuardedListener, Limits, TrackRequests};

/// A started gRPC server.
pub struct GrpcServer {
    pub local_addr: SocketAddr,
    service_name: &'static str,
    health: HealthReporter,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection set-up failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Binds `listen_addr` and serves `routes` (plus health and reflection) until
/// `shutdown` is cancelled. Health says NOT_SERVING until [`GrpcServer::set_serving`].
pub async fn serve(
    listen_addr: SocketAddr,
    service_name: &'static str,
    routes: Routes,
    file_descriptor_set: &'static [u8],
    shutdown: &CancellationToken,
) -> Result<GrpcServer, ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["", service_name] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set)
        .build_v1alpha()?;
    let listener = TcpListener::bind(listen_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen_addr,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen_addr,
        source,
    })?;
    crate::connections::raise_fd_limit();
    let incoming = GuardedListener::new(listener, Limits::GRPC, service_name);
    let shutdown = shutdown.child_token();
    let stopping = shutdown.clone();
    let stopping_health = health.clone();
    let router = routes
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router()
        .route(
            "/metrics",
            axum::routing::get(|| async { crate::telemetry::render_metrics() }),
        );
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .accept_http1(true)
            .layer(TrackRequests)
            .layer(tower::layer::layer_fn(|inner| RpcTelemetry { inner }))
            .add_routes(Routes::from(router))
            .serve_with_incoming_shutdown(incoming, async move {
                stopping.cancelled().await;
                for name in ["", service_name] {
                    stopping_health
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
            }),
    );
    Ok(GrpcServer {
        local_addr,
        service_name,
        health,
        shutdown,
        task,
    })
}

impl GrpcServer {
    /// Health turns SERVING (call once the store has answered).
    pub async fn set_serving(&self) {
        for name in ["", self.service_name] {
            self.health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
    }

    /// Stops accepting, finishes in-flight calls and waits for the server to end.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the server ends (its shutdown token was cancelled).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task.await??;
        Ok(())
    }
}

/// A span per call (a child of the caller's trace, when it sent one) and the RPC
/// metrics: `reeve_rpc_requests_total` and `reeve_rpc_duration_seconds` by method and
/// gRPC code. The code is read from the response headers, where tonic puts every error
/// (a trailers-only response); a call whose headers carry none ended OK.
#[derive(Debug, Clone)]
pub struct RpcTelemetry<S> {
    inner: S,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for RpcTelemetry<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path().to_owned();
        let span = tracing::info_span!("rpc", rpc.method = %path, otel.kind = "server");
        crate::telemetry::adopt_trace_context(&span, request.headers());
        let started = Instant::now();
        Box::pin(
            async move {
                let result = inner.call(request).await;
                let (code, known) = match &result {
                    Ok(response) => {
                        let code = response
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<i32>().ok())
                            .map(tonic::Code::from_i32)
                            .unwrap_or(tonic::Code::Ok);
                        // Authentication is checked before routing: an unauthenticated or
                        // unrouted path may be anything a caller made up.
                        let routed = !matches!(code, tonic::Code::Unimplemented | tonic::Code::Unauthenticated)
                            && response.status() != http::StatusCode::NOT_FOUND;
                        (format!("{code:?}"), routed)
                    }
                    Err(_) => ("Unavailable".to_owned(), false),
                };
                // Paths nobody serves are one label, so callers cannot grow the metrics.
                let method = if known { path } else { "unknown".to_owned() };
                metrics::counter!("reeve_rpc_requests_total", "method" => method.clone(), "code" => code.clone()).increment(1);
                metrics::histogram!("reeve_rpc_duration_seconds", "method" => method, "code" => code)
                    .record(started.elapsed().as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}
