//! `reeve events`: the Stripe events a person must look at, one event in full, and a
//! replay of one event through the normal webhook path.
//!
//! Reading goes straight to the bridge's event store (`REEVE_DATABASE_URL`, through
//! webhook-bridge's `EventStore`: the same queries the bridge runs). A replay is a
//! delivery: the stored payload, signed with `STRIPE_WEBHOOK_SECRET`, is posted to the
//! bridge's webhook (`REEVE_HTTP_ADDR`), so it is verified, stored and applied exactly
//! as Stripe's own redelivery would be (credits-svc keys make it idempotent). An event
//! that needed attention and is now applied takes its new outcome.

use anyhow::Context;
use clap::Subcommand;
use reeve_runtime::config;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use webhook_bridge::stripe::events::{EventStore, Outcome, StoredEvent};

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Stored Stripe events that need a person (needs_attention, failed,
    /// ignored_currency, and events stuck without an outcome), oldest first.
    Attention {
        #[arg(long, default_value_t = 1_000)]
        limit: i64,
    },
    /// One stored event, its payload included.
    Show { event_id: String },
    /// Delivers a stored event again to the bridge's webhook (idempotent).
    Replay { event_id: String },
}

async fn store() -> anyhow::Result<EventStore> {
    let url = config::var("REEVE_DATABASE_URL")?
        .unwrap_or_else(|| credits_svc::DEFAULT_DATABASE_URL.to_owned());
    EventStore::open(&url)
        .await
        .context("opening the Stripe event store (REEVE_DATABASE_URL)")
}

fn time(us: Option<i64>) -> Value {
    us.and_then(chrono::DateTime::from_timestamp_micros)
        .map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
        .unwrap_or(Value::Null)
}

fn summary(event: &StoredEvent) -> Value {
    json!({
        "event_id": event.event_id,
        "event_type": event.event_type,
        "outcome": event.outcome,
        "detail": event.detail,
        "user_id": event.user_id,
        "deliveries": event.deliveries,
        "received_at": time(Some(event.received_at_us)),
        "processed_at": time(event.processed_at_us),
    })
}

pub async fn run(command: EventsCommand, json: bool) -> anyhow::Result<()> {
    let events = store().await?;
    match command {
        EventsCommand::Attention { limit } => {
            let found = events.needing_attention(limit).await?;
            if json {
                let list: Vec<Value> = found.iter().map(summary).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"events": list}))?
                );
            } else if found.is_empty() {
                println!("no Stripe event needs attention");
            } else {
                for event in &found {
                    println!(
                        "{}  {:<32} {:<16} {}",
                        event.event_id, event.event_type, event.outcome, event.detail
                    );
                }
            }
        }
        EventsCommand::Show { event_id } => {
            let event = events
                .get(&event_id)
                .await?
                .with_context(|| format!("no stored Stripe event {event_id}"))?;
            let mut document = summary(&event);
            document["payload"] =
                serde_json::from_str(&event.payload).unwrap_or(Value::String(event.payload));
            println!("{}", serde_json::to_string_pretty(&document)?);
        }
        EventsCommand::Replay { event_id } => {
            let event = events
                .get(&event_id)
                .await?
                .with_context(|| format!("no stored Stripe event {event_id}"))?;
            let answer = replay(&event).await?;
            let outcome = answer
                .get("outcome")
                .and_then(Value::as_str)
                .and_then(Outcome::parse)
                .context("the bridge answered no outcome")?;
            // A redelivery never rewrites a final outcome; an operator's replay of an
            // event that waited for a person records what it did now.
            if event.outcome == Outcome::NeedsAttention.as_str()
                && outcome.is_final()
                && outcome != Outcome::NeedsAttention
            {
                let now = reeve_runtime::clock::now_us();
                events
                    .resolve(&event_id, outcome, "replayed by an operator", now)
                    .await?;
            }
            let after = events.get(&event_id).await?.unwrap_or(event);
            if json {
                let mut document = summary(&after);
                document["replay_outcome"] = json!(outcome.as_str());
                println!("{}", serde_json::to_string_pretty(&document)?);
            } else {
                println!(
                    "replayed {event_id}: {outcome} (stored outcome {}: {})",
                    after.outcome, after.detail
                );
            }
        }
    }
    Ok(())
}

/// Posts the stored payload, freshly signed, to the bridge's webhook.
async fn replay(event: &StoredEvent) -> anyhow::Result<Value> {
    let secret = config::var("STRIPE_WEBHOOK_SECRET")?.ok_or_else(|| {
        config::ConfigError::new("STRIPE_WEBHOOK_SECRET", "is required to replay an event")
    })?;
    let secret = secrecy::SecretString::from(secret);
    let addr = config::var("REEVE_HTTP_ADDR")?
        .unwrap_or_else(|| webhook_bridge::DEFAULT_HTTP_ADDR.to_owned())
        .replace("0.0.0.0", "127.0.0.1");
    let url = format!("http://{addr}/api/credits/webhook");
    let signature = fake_stripe::sign(
        &event.payload,
        secret.expose_secret(),
        reeve_runtime::clock::now_us() / 1_000_000,
    );
    let response = reqwest::Client::new()
        .post(&url)
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(event.payload.clone())
        .send()
        .await
        .with_context(|| format!("cannot reach the bridge at {url} (REEVE_HTTP_ADDR)"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "the bridge answered {status}: {body}");
    Ok(body)
}
