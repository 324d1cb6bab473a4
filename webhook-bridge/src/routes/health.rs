//! `/healthz` (the process is up) and `/readyz` (both gRPC backends answer SERVING and
//! the event store answers), for load balancers and Kubernetes probes.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::AppState;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn serving(channel: tonic::transport::Channel) -> Result<(), String> {
    let mut client = HealthClient::new(channel);
    match tokio::time::timeout(
        PROBE_TIMEOUT,
        client.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    {
        Err(_) => Err("timed out".to_owned()),
        Ok(Err(status)) => {
            tracing::warn!(code = ?status.code(), "readiness: a backend did not answer");
            Err("unavailable".to_owned())
        }
        Ok(Ok(reply)) if reply.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(Ok(_)) => Err("not serving".to_owned()),
    }
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let (credits, quota, store) = tokio::join!(
        serving(state.credits_channel.clone()),
        serving(state.quota_channel.clone()),
        async {
            tokio::time::timeout(PROBE_TIMEOUT, state.events.ping())
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|error| {
                    // The details (host names, driver messages) go to the log, not to the caller.
                    tracing::warn!(%error, "readiness: the event store did not answer");
                    "unavailable".to_owned()
                })
        },
    );
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.clone(),
    };
    let ready = credits.is_ok() && quota.is_ok() && store.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"ready": ready, "credits_svc": show(&credits), "quota_svc": show(&quota), "event_store": show(&store)}),
        ),
    )
}
