//! `reeve endpoints` and `reeve deliveries`: the operator's side of outbound webhooks.
//! Endpoints are registered (with a new Standard Webhooks secret, shown once), listed,
//! given a new secret, enabled again and removed; the attempt log is read, and a
//! delivery sent again by hand.
//!
//! Like `reeve events`, this goes straight to the outbox tables (`REEVE_DATABASE_URL`)
//! through reeve-events' `EventStore`, the same queries the dispatchers run; it never
//! sends a webhook itself (a redelivery is made due, and a dispatcher sends it).

use anyhow::{Context, bail};
use clap::Subcommand;
use reeve_events::event::rfc3339;
use reeve_events::{AttemptRecord, Endpoint, EventStore, RetryOutcome};
use reeve_runtime::config;
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum EndpointsCommand {
    /// Register an endpoint; its signing secret is printed this once.
    Add {
        /// Where events are POSTed (http or https; redirects are not followed).
        url: String,
        /// Comma-separated event types it receives (e.g. credits.balance_low,lot.expiring);
        /// default: every type.
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
    },
    /// Every endpoint, oldest first.
    List,
    /// Remove an endpoint; its pending deliveries are cancelled, its log stays.
    Remove { endpoint_id: String },
    /// Give an endpoint a new secret (printed this once); the old one keeps signing
    /// beside it for the overlap, so the receiver can switch without dropping a message.
    RotateSecret {
        endpoint_id: String,
        /// Hours the old secret still signs (every message carries both signatures).
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(0..=720))]
        overlap_hours: u32,
    },
    /// Enable an endpoint disabled after days of failures (its failure clock restarts;
    /// deliveries cancelled when it was disabled stay cancelled: `reeve deliveries retry`).
    Enable { endpoint_id: String },
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// Send a delivery again (due now, with the same webhook-id).
    Retry { delivery_id: String },
}

async fn store() -> anyhow::Result<EventStore> {
    let url = config::var("REEVE_DATABASE_URL")?
        .unwrap_or_else(|| credits_svc::DEFAULT_DATABASE_URL.to_owned());
    EventStore::open(&url)
        .await
        .context("opening the webhook outbox (REEVE_DATABASE_URL)")
}

fn endpoint_json(endpoint: &Endpoint) -> Value {
    json!({
        "id": endpoint.id,
        "url": endpoint.url,
        "events": endpoint.events,
        "status": endpoint.status,
        "disabled_reason": endpoint.disabled_reason,
        "created_at": rfc3339(endpoint.created_at_us),
    })
}

fn attempt_json(attempt: &AttemptRecord) -> Value {
    json!({
        "delivery_id": attempt.delivery_id,
        "event_id": attempt.event_id,
        "event_type": attempt.event_type,
        "endpoint_id": attempt.endpoint_id,
        "attempt": attempt.attempt,
        "outcome": attempt.outcome,
        "status_code": attempt.status_code,
        "error": attempt.error,
        "latency_ms": attempt.latency_ms,
        "response_excerpt": attempt.response_excerpt,
        "attempted_at": rfc3339(attempt.attempted_at_us),
        "delivery_status": attempt.delivery_status,
    })
}

fn events_text(events: &[String]) -> String {
    if events.is_empty() {
        "*".to_owned()
    } else {
        events.join(",")
    }
}

pub async fn endpoints(command: EndpointsCommand, json: bool) -> anyhow::Result<()> {
    let store = store().await?;
    match command {
        EndpointsCommand::Add { url, events } => {
            let events: Vec<String> = events
                .into_iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            let added = store
                .add_endpoint(&url, &events, reeve_runtime::clock::now_us())
                .await?;
            if json {
                println!(
                    "{}",
                    json!({
                        "id": added.id,
                        "url": added.url,
                        "events": added.events,
                        "secret": added.secret,
                    })
                );
            } else {
                println!("endpoint {} → {}", added.id, added.url);
                println!("events   {}", events_text(&added.events));
                println!("secret   {}", added.secret);
                println!("(the secret is shown this once: verify webhook-signature with it)");
            }
        }
        EndpointsCommand::List => {
            let list = store.endpoints().await?;
            if json {
                let list: Vec<Value> = list.iter().map(endpoint_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no endpoint registered");
            } else {
                for endpoint in &list {
                    println!(
                        "{}  {:<8} {}  {}",
                        endpoint.id,
                        endpoint.status,
                        endpoint.url,
                        events_text(&endpoint.events)
                    );
                }
            }
        }
        EndpointsCommand::RotateSecret {
            endpoint_id,
            overlap_hours,
        } => {
            let now_us = reeve_runtime::clock::now_us();
            let overlap_us = i64::from(overlap_hours) * 3_600_000_000;
            let Some(secret) = store
                .rotate_secret(&endpoint_id, overlap_us, now_us)
                .await?
            else {
                bail!("no endpoint {endpoint_id}");
            };
            let until = rfc3339(now_us.saturating_add(overlap_us));
            if json {
                println!(
                    "{}",
                    json!({"id": endpoint_id, "secret": secret, "previous_secret_valid_until": until})
                );
            } else {
                println!("endpoint {endpoint_id}: new secret");
                println!("secret   {secret}");
                println!("(shown this once; the previous secret also signs until {until})");
            }
        }
        EndpointsCommand::Enable { endpoint_id } => {
            if !store.enable_endpoint(&endpoint_id).await? {
                bail!("no endpoint {endpoint_id}");
            }
            if json {
                println!("{}", json!({"id": endpoint_id, "status": "enabled"}));
            } else {
                println!("endpoint {endpoint_id} enabled");
            }
        }
        EndpointsCommand::Remove { endpoint_id } => {
            if !store.remove_endpoint(&endpoint_id).await? {
                bail!("no endpoint {endpoint_id}");
            }
            if json {
                println!("{}", json!({"id": endpoint_id, "removed": true}));
            } else {
                println!("endpoint {endpoint_id} removed");
            }
        }
    }
    Ok(())
}

pub async fn deliveries(
    command: Option<DeliveriesCommand>,
    endpoint: Option<String>,
    failed: bool,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let store = store().await?;
    match command {
        Some(DeliveriesCommand::Retry { delivery_id }) => {
            let outcome = store
                .retry(&delivery_id, reeve_runtime::clock::now_us())
                .await?;
            let word = match outcome {
                RetryOutcome::NotFound => bail!("no delivery {delivery_id}"),
                RetryOutcome::Scheduled => "scheduled",
            };
            if json {
                println!("{}", json!({"delivery_id": delivery_id, "outcome": word}));
            } else {
                println!("delivery {delivery_id}: {word}");
            }
        }
        None => {
            let attempts = store.attempts(endpoint.as_deref(), failed, limit).await?;
            if json {
                let list: Vec<Value> = attempts.iter().map(attempt_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if attempts.is_empty() {
                println!("no delivery attempt");
            } else {
                for a in &attempts {
                    let status = a
                        .status_code
                        .map_or_else(|| "-".to_owned(), |code| code.to_string());
                    println!(
                        "{}  {}  {} {:<24} {}  #{} {:<9} {:>3} {:>5} ms  {}",
                        rfc3339(a.attempted_at_us),
                        a.delivery_id,
                        a.event_id,
                        a.event_type,
                        a.endpoint_id,
                        a.attempt,
                        a.outcome,
                        status,
                        a.latency_ms,
                        a.error.as_deref().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}
