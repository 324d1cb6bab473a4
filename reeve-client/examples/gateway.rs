//! A small "LLM proxy" in front of a fake model: the shape of Reeve's gateway.
//!
//! Per request it (1) consumes one unit of the `copy_rewrites` quota through the
//! [`QuotaGuard`] (429 when used up, keyed by the request id so a retried request is
//! not counted twice), (2) runs the model, giving the unit back if the model fails,
//! (3) hands the call's cost to the [`Recorder`] and answers at once: the deduction is
//! flushed in a DeductBatch with other calls' and can no longer be lost (with
//! `REEVE_RECORDER_WAL`, not even by a crash). Refused deductions (insufficient,
//! invalid) reach the outcome handler, which here logs them; a real gateway would
//! flag the user. On Ctrl-C or SIGTERM the server stops taking requests and
//! `close()` drains the recorder before the process exits.
//!
//! Holds (issue 10) change step 3 only: before the model runs, `Hold` reserves the
//! request's maximum cost (a 402 instead of an unpaid call when the user cannot cover
//! it); after, the real cost is settled through the same recorder as a second
//! [`reeve_client::Charge`] variant flushed with `SettleHoldBatch`, and a failed model
//! call releases the hold. The handler below stays as it is.
//!
//! Run `reeve up` in another terminal (it prints the service token into
//! `./reeve-data/dev-secrets.toml`), then:
//!
//! ```sh
//! REEVE_SERVICE_TOKEN=... cargo run -p reeve-client --example gateway
//! curl -s -X POST localhost:8090/v1/completions -H 'x-user-id: alice' \
//!   -H 'x-request-id: req-1' -d 'write me a tagline'
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use reeve_client::{ClientBuilder, ItemOutcome, QuotaGuard, Recorder, SecretString};

/// Micros per token the fake model charges (0.00002 credits).
const PRICE_MICROS_PER_TOKEN: i64 = 20;
const FEATURE: &str = "copy_rewrites";

struct Gateway {
    guard: QuotaGuard,
    recorder: Recorder,
}

/// The fake model: an answer and the tokens it "used".
async fn fake_model(prompt: &str) -> Result<(String, i64), String> {
    if prompt.trim().is_empty() {
        return Err("empty prompt".to_owned());
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let answer = format!("A fresh take on: {}", prompt.trim());
    let tokens = (prompt.split_whitespace().count() + answer.split_whitespace().count()) as i64;
    Ok((answer, tokens * 10))
}

async fn completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    prompt: String,
) -> (StatusCode, String) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    // A real gateway takes the user from a verified JWT, never from a plain header.
    let (Some(user_id), Some(request_id)) = (header("x-user-id"), header("x-request-id")) else {
        return (
            StatusCode::BAD_REQUEST,
            "x-user-id and x-request-id are required\n".to_owned(),
        );
    };
    let permit = match gateway.guard.require(user_id, FEATURE, request_id).await {
        Ok(permit) => permit,
        Err(refusal) => {
            let status = StatusCode::from_u16(refusal.http_status())
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return (status, format!("{refusal}\n"));
        }
    };
    let (answer, tokens) = match fake_model(&prompt).await {
        Ok(done) => done,
        Err(failure) => {
            // Nothing was produced: give the quota unit back (safe to repeat).
            let _ = gateway.guard.release(&permit).await;
            return (
                StatusCode::BAD_GATEWAY,
                format!("model failed: {failure}\n"),
            );
        }
    };
    let cost_micros = tokens * PRICE_MICROS_PER_TOKEN;
    // The request id is the deduction's key: a retried request is charged once.
    match gateway
        .recorder
        .record(user_id, cost_micros, format!("llm:{request_id}"))
        .await
    {
        Ok(()) => (StatusCode::OK, format!("{answer}\n({tokens} tokens)\n")),
        // Only when closing (or the write-ahead file failed): the answer is not sent.
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")),
    }
}

fn on_outcome(item: ItemOutcome) {
    if item.outcome.is_success() {
        tracing::debug!(key = item.charge.idempotency_key(), "charged");
    } else {
        // Insufficient or invalid: final, never retried by the recorder. A real
        // gateway would block the user's next calls or open a collection case.
        tracing::warn!(
            key = item.charge.idempotency_key(),
            user_id = item.charge.user_id(),
            outcome = ?item.outcome,
            "deduction refused"
        );
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber_init();
    let env =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let token = SecretString::from(
        std::env::var("REEVE_SERVICE_TOKEN").map_err(|_| "REEVE_SERVICE_TOKEN is required")?,
    );
    let credits = ClientBuilder::new(env("REEVE_CREDITS_ADDR", "127.0.0.1:50051"))
        .service_token(token.clone())
        .connect_lazy()?;
    let quota = ClientBuilder::new(env("REEVE_QUOTA_ADDR", "127.0.0.1:50052"))
        .service_token(token)
        .request_timeout(Duration::from_secs(2))
        .connect_lazy()?;
    let mut recorder = Recorder::builder(credits.credits()).on_outcome(on_outcome);
    if let Ok(path) = std::env::var("REEVE_RECORDER_WAL") {
        recorder = recorder.write_ahead_file(path);
    }
    let recorder = recorder.start()?;
    let gateway = Arc::new(Gateway {
        guard: QuotaGuard::from_connection(&quota),
        recorder: recorder.clone(),
    });
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind(env("GATEWAY_ADDR", "127.0.0.1:8090")).await?;
    eprintln!("gateway listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    // Requests are done: every accepted deduction is flushed before exit.
    recorder.close().await?;
    eprintln!("recorder drained; bye");
    Ok(())
}

/// Log lines on stderr (`RUST_LOG`, default info).
fn tracing_subscriber_init() {
    let _ = reeve_runtime::telemetry::init("gateway-example");
}
