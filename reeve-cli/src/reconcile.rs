//! `reeve reconcile`: compares Stripe's payments, refunds and disputes of a period with
//! the ledger (webhook-bridge's reconciler, run here) and, with `--repair`, applies
//! what is certain through the webhook path's own `RecordPaymentEvent` requests.
//!
//! Exit codes are part of the contract: 0 when nothing but `matched` remains, 1 when
//! differences remain, 2 on an error (configuration, Stripe, credits-svc, the store).

use std::process::ExitCode;

use anyhow::Context;
use reeve_runtime::Micros;
use reeve_runtime::config::{self, ConfigError};
use secrecy::SecretString;
use webhook_bridge::stripe::events::EventStore;
use webhook_bridge::stripe::reconcile::{Class, Reconciler, Report, StripeApi, Window};

/// What a reconciliation looks at when `--since` is not given.
const DEFAULT_PERIOD_SECS: i64 = 30 * 86_400;

pub async fn main(
    since: Option<String>,
    until: Option<String>,
    repair: bool,
    json: bool,
) -> ExitCode {
    match reconcile(since, until, repair).await {
        Ok(report) => {
            print(&report, json);
            if report.remaining().next().is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            match error.downcast_ref::<ConfigError>() {
                Some(config) => eprintln!("reeve: configuration error: {config}"),
                None => eprintln!("reeve: reconcile failed: {error:#}"),
            }
            ExitCode::from(2)
        }
    }
}

fn parse_time(flag: &str, text: &str) -> anyhow::Result<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp())
        .with_context(|| format!("{flag} {text:?} is not an RFC 3339 time"))
}

/// Stripe's key and API base: the configured ones, or the fake Stripe of a local
/// `reeve up` when no `STRIPE_SECRET_KEY` is set.
pub fn stripe_access() -> Result<(SecretString, String), ConfigError> {
    let (key, base) = match config::var("STRIPE_SECRET_KEY")? {
        Some(key) => (
            key,
            config::var("STRIPE_API_BASE")?.unwrap_or_else(|| "https://api.stripe.com/".to_owned()),
        ),
        None => {
            let addr = config::var("REEVE_FAKE_STRIPE_ADDR")?
                .unwrap_or_else(|| "127.0.0.1:12111".to_owned());
            (
                crate::dev::FAKE_STRIPE_KEY.to_owned(),
                config::var("STRIPE_API_BASE")?.unwrap_or_else(|| format!("http://{addr}/")),
            )
        }
    };
    let base = if base.ends_with('/') {
        base
    } else {
        format!("{base}/")
    };
    Ok((SecretString::from(key), base))
}

async fn reconcile(
    since: Option<String>,
    until: Option<String>,
    repair: bool,
) -> anyhow::Result<Report> {
    let until = match until {
        Some(text) => parse_time("--until", &text)?,
        None => reeve_runtime::clock::now_us() / 1_000_000,
    };
    let since = match since {
        Some(text) => parse_time("--since", &text)?,
        None => until - DEFAULT_PERIOD_SECS,
    };
    anyhow::ensure!(since <= until, "--since is after --until");
    let (key, base) = stripe_access()?;
    let database_url = config::var("REEVE_DATABASE_URL")?
        .unwrap_or_else(|| credits_svc::DEFAULT_DATABASE_URL.to_owned());
    let events = EventStore::open(&database_url)
        .await
        .context("opening the Stripe event store (REEVE_DATABASE_URL)")?;
    let reconciler = Reconciler {
        stripe: StripeApi::new(&key, &base)?,
        credits: crate::admin::credits_client().await?,
        events: Some(events),
        currency: config::currency()?,
    };
    Ok(reconciler.run(Window { since, until }, repair).await?)
}

fn print(report: &Report, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        return;
    }
    println!("reconciliation {} .. {}", report.since, report.until);
    for class in Class::ALL {
        let total = report
            .totals
            .get(class.as_str())
            .copied()
            .unwrap_or_default();
        println!(
            "  {:<32} {:>6}  {:>20}",
            class.as_str(),
            total.count,
            Micros(total.amount_micros).to_string()
        );
    }
    for item in report.items.iter().filter(|i| i.class != Class::Matched) {
        let entries: Vec<String> = item.entry_ids.iter().map(i64::to_string).collect();
        println!(
            "{:<32} {:<36} user={:<20} amount={:<14} entries=[{}]{}  {}",
            item.class.as_str(),
            item.stripe_id,
            item.user_id,
            Micros(item.amount_micros).to_string(),
            entries.join(","),
            if item.repaired { " REPAIRED" } else { "" },
            item.detail
        );
    }
    let left = report.remaining().count();
    if left == 0 {
        println!("nothing but matched remains");
    } else {
        println!("{left} difference(s) remain");
    }
}
