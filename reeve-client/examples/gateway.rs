//! A small "LLM proxy" in front of a fake model: the shape of Reeve's gateway.
//!
//! Per request it (1) consumes one unit of the `copy_rewrites` quota through the
//! [`QuotaGuard`] (429 when used up, keyed by the request id so a retried request is
//! not counted twice), (2) runs the model as a metered call ([`Meter`]): a hold
//! reserves the call's maximum cost first (402 when the user cannot cover it, so no
//! call runs unpaid), then the model runs, then its real cost is handed to the
//! [`Recorder`] as the hold's settle and the answer goes out at once: the settle is
//! flushed in a SettleHoldBatch with other calls' and can no longer be lost (with
//! `REEVE_RECORDER_WAL`, not even by a crash). A failed model call releases the hold
//! and gives the quota unit back; a client that hangs up mid-call drops the handler's
//! future, which releases the hold too. Refused settles (the hold already resolved)
//! reach the outcome handler, which here logs them; a real gateway would flag them.
//! On Ctrl-C or SIGTERM the server stops taking requests and `close()` drains the
//! recorder before the process exits.
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
use reeve_client::{
    ClientBuilder, ItemOutcome, Meter, MeteredError, QuotaGuard, Recorder, Reservation,
    SecretString,
};

/// Micros per token the fake model charges (0.00002 credits).
const PRICE_MICROS_PER_TOKEN: i64 = 20;
/// The most tokens one call may use: what the hold reserves.
const MAX_TOKENS_PER_CALL: i64 = 4_096;
const FEATURE: &str = "copy_rewrites";

struct Gateway {
    guard: QuotaGuard,
    meter: Meter,
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
    // The request id keys the hold and its settle: a retried request is charged once
    // (a request id whose call has ended is refused, not run again).
    let reservation = Reservation::new(
        user_id,
        format!("llm:{request_id}"),
        MAX_TOKENS_PER_CALL * PRICE_MICROS_PER_TOKEN,
    )
    .with_description("completion");
    let called = gateway
        .meter
        .call(reservation, |_hold| async {
            let (answer, tokens) = fake_model(&prompt).await?;
            Ok::<_, String>(((answer, tokens), tokens * PRICE_MICROS_PER_TOKEN))
        })
        .await;
    let (status, body) = match called {
        Ok((answer, tokens)) => return (StatusCode::OK, format!("{answer}\n({tokens} tokens)\n")),
        Err(MeteredError::Insufficient {
            balance_micros,
            held_micros,
            required_micros,
        }) => (
            StatusCode::PAYMENT_REQUIRED,
            format!(
                "insufficient credits: {required_micros} micros required, {} available\n",
                balance_micros - held_micros
            ),
        ),
        Err(MeteredError::AlreadyResolved { .. }) => (
            StatusCode::CONFLICT,
            "this request id was already answered\n".to_owned(),
        ),
        Err(MeteredError::Work(failure)) => (
            StatusCode::BAD_GATEWAY,
            format!("model failed: {failure}\n"),
        ),
        // The hold could not be made (service down), or the cost could not be handed
        // over (closing): the answer is not sent.
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")),
    };
    // Nothing was produced: give the quota unit back (safe to repeat).
    let _ = gateway.guard.release(&permit).await;
    (status, body)
}

fn on_outcome(item: ItemOutcome) {
    if item.outcome.is_success() {
        tracing::debug!(key = item.charge.idempotency_key(), "charged");
    } else {
        // Already resolved (the hold was released or expired before the settle) or
        // invalid: final, never retried by the recorder. A real gateway would flag the
        // call for review.
        tracing::warn!(
            key = item.charge.idempotency_key(),
            user_id = item.charge.user_id(),
            outcome = ?item.outcome,
            "charge refused"
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
        meter: Meter::new(credits.credits(), recorder.clone()),
    });
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind(env("GATEWAY_ADDR", "127.0.0.1:8090")).await?;
    eprintln!("gateway listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    // Requests are done: every accepted settle is flushed before exit.
    recorder.close().await?;
    eprintln!("recorder drained; bye");
    Ok(())
}

/// Log lines on stderr (`RUST_LOG`, default info).
fn tracing_subscriber_init() {
    let _ = reeve_runtime::telemetry::init("gateway-example");
}
