//! Serving one Reeve gRPC service the same way everywhere: health
//! (`grpc.health.v1.Health`) and reflection (v1 and v1alpha) beside it, TCP_NODELAY on
//! accepted sockets, and a graceful stop that turns health NOT_SERVING first and then
//! drains in-flight calls.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

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
    Bind { addr: SocketAddr, source: std::io::Error },
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
        health.set_service_status(name, ServingStatus::NotServing).await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set)
        .build_v1alpha()?;
    let listener = TcpListener::bind(listen_addr).await.map_err(|source| ServeError::Bind { addr: listen_addr, source })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: listen_addr, source })?;
    // Without TCP_NODELAY a reply waits ~40 ms for the peer's delayed ACK.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let shutdown = shutdown.child_token();
    let stopping = shutdown.clone();
    let stopping_health = health.clone();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, async move {
                stopping.cancelled().await;
                for name in ["", service_name] {
                    stopping_health.set_service_status(name, ServingStatus::NotServing).await;
                }
            }),
    );
    Ok(GrpcServer { local_addr, service_name, health, shutdown, task })
}

impl GrpcServer {
    /// Health turns SERVING (call once the store has answered).
    pub async fn set_serving(&self) {
        for name in ["", self.service_name] {
            self.health.set_service_status(name, ServingStatus::Serving).await;
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
