//! What every Reeve service shares and nothing more: exact money, the service-token
//! check, telemetry set-up and the shutdown signal. Business rules live in the services.

pub mod auth;
pub mod clock;
pub mod config;
pub mod connections;
pub mod db;
pub mod group_commit;
pub mod grpc;
pub mod ids;
pub mod money;
pub mod shutdown;
pub mod telemetry;

pub use money::Micros;
