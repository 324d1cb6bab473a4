//! Guarding metered work with quota-svc, the Rust counterpart of
//! `Depends(require_tier("ad_generations"))`.
//!
//! Start quota-svc (`REEVE_SERVICE_TOKENS=dev-service-token cargo run --bin quota-svc`),
//! then: `cargo run -p reeve-client --example quota_guard -- alice`

use reeve_client::{ClientBuilder, GuardError, QuotaGuard, SecretString};

/// What an HTTP handler does: consume one unit, do the work, give the unit back if
/// the work failed, and map a refusal to its HTTP status.
async fn generate_ad(
    guard: &QuotaGuard,
    user_id: &str,
    request_id: &str,
) -> Result<String, (u16, String)> {
    let permit = guard
        .require(user_id, "ad_generations", request_id)
        .await
        .map_err(|e: GuardError| (e.http_status(), e.to_string()))?;
    let work: Result<String, String> = Ok(format!("an ad for {user_id}"));
    match work {
        Ok(ad) => Ok(ad),
        Err(failure) => {
            // The unit was not really used: give it back (safe to repeat).
            let _ = guard.release(&permit).await;
            Err((500, failure))
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let user_id = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "alice".to_owned());
    let addr = std::env::var("REEVE_QUOTA_ADDR").unwrap_or_else(|_| "127.0.0.1:50052".to_owned());
    let token =
        std::env::var("REEVE_SERVICE_TOKEN").unwrap_or_else(|_| "dev-service-token".to_owned());
    let connection = ClientBuilder::new(addr)
        .service_token(SecretString::from(token))
        .connect()
        .await?;
    let guard = QuotaGuard::from_connection(&connection);
    for attempt in 0..12 {
        match generate_ad(&guard, &user_id, &format!("example-request-{attempt}")).await {
            Ok(ad) => println!("request {attempt}: 200 {ad}"),
            Err((status, message)) => println!("request {attempt}: {status} {message}"),
        }
    }
    Ok(())
}
