//! `reeve up`: the whole system in one process — credits-svc, quota-svc and
//! webhook-bridge, plus the fake Stripe when no `STRIPE_SECRET_KEY` is set — each
//! configured exactly as its own binary would be, on one database.
//!
//! Shutdown (SIGTERM/SIGINT) goes front to back: the bridge stops accepting and
//! finishes its in-flight requests (which still reach the services), then the gRPC
//! services turn NOT_SERVING and drain, each within [`DRAIN_DEADLINE`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use reeve_runtime::config::{self, ConfigError, Source};
use reeve_runtime::telemetry::{self, LogFormat};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::dev;

/// How long each stage of a shutdown may take before the process exits anyway.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
const DEFAULT_FAKE_STRIPE_ADDR: &str = "127.0.0.1:12111";
/// The user of the signed-in billing link `reeve up` prints.
const DEMO_USER: &str = "demo";

/// `addr` with port 0 replaced by a free port (bound and released at once).
fn concrete_port(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let probe = std::net::TcpListener::bind(addr)
        .with_context(|| format!("choosing a port for REEVE_HTTP_ADDR {addr}"))?;
    Ok(probe.local_addr()?)
}

pub async fn run(data_dir: &Path) -> anyhow::Result<()> {
    let generated = dev::install_layers(data_dir, true)?;
    telemetry::init_with("reeve", LogFormat::Pretty)?;
    let mut credits_config = credits_svc::Config::from_env()?;
    let quota_config = quota_svc::Config::from_env()?;
    quota_config.registry()?;
    let mut bridge_config = webhook_bridge::Config::from_env()?;
    // Stripe Checkout comes back to the bridge's billing page unless configured: the
    // address must be known now, so port 0 is chosen here rather than at bind.
    bridge_config.http_addr = concrete_port(bridge_config.http_addr)?;
    if let Some(checkout) = credits_config.checkout.as_mut() {
        let page = dev::billing_url(bridge_config.http_addr);
        if config::source("REEVE_CHECKOUT_SUCCESS_URL") == Source::Unset {
            checkout.success_url = format!("{page}?checkout=success");
        }
        if config::source("REEVE_CHECKOUT_CANCEL_URL") == Source::Unset {
            checkout.cancel_url = format!("{page}?checkout=cancel");
        }
    }
    let database_url = credits_config.database_url.clone();

    let services = CancellationToken::new();
    let front = CancellationToken::new();
    let fake_stripe = if config::source("STRIPE_SECRET_KEY") == Source::Default {
        let listen_addr: SocketAddr =
            config::parse_or("REEVE_FAKE_STRIPE_ADDR", DEFAULT_FAKE_STRIPE_ADDR.parse()?)?;
        let fake = fake_stripe::start(
            fake_stripe::Config {
                listen_addr,
                webhook_url: String::new(),
                // The fake signs with the secret the bridge verifies (a test double's
                // plain field: exposed here, once).
                webhook_secret: bridge_config.webhook_secret.expose_secret().to_owned(),
            },
            services.clone(),
        )
        .await
        .context("starting the fake Stripe (check REEVE_FAKE_STRIPE_ADDR)")?;
        if let Some(checkout) = credits_config.checkout.as_mut() {
            checkout.api_base = fake.api_base();
        }
        // REEVE_FAKE_STRIPE_WEBHOOKS=off: payments Stripe knows and the ledger does not.
        if config::var("REEVE_FAKE_STRIPE_WEBHOOKS")?
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("off"))
        {
            fake.set_webhooks(false);
        }
        Some(fake)
    } else {
        None
    };

    let credits = credits_svc::start(credits_config, services.clone())
        .await
        .context("starting credits-svc (check REEVE_DATABASE_URL and REEVE_CREDITS_ADDR)")?;
    let quota = quota_svc::start(quota_config, services.clone())
        .await
        .context("starting quota-svc (check REEVE_DATABASE_URL and REEVE_QUOTA_ADDR)")?;
    bridge_config.credits_url = format!("http://{}", credits.local_addr);
    bridge_config.quota_url = format!("http://{}", quota.local_addr);
    let bridge = webhook_bridge::start(bridge_config, front.clone())
        .await
        .context("starting webhook-bridge (check REEVE_DATABASE_URL and REEVE_HTTP_ADDR)")?;
    let http = bridge.local_addr;
    if let Some(fake) = &fake_stripe {
        fake.set_webhook_url(format!("http://{http}/api/credits/webhook"));
    }
    if let Some(mut settings) = webhook_bridge::stripe::reconcile::Settings::from_env()? {
        if let Some(fake) = &fake_stripe {
            settings.api_base = fake.api_base();
        }
        bridge.spawn_reconciler(settings, front.clone())?;
    }

    let store = if database_url.starts_with("sqlite:") {
        "embedded SQLite"
    } else {
        "PostgreSQL"
    };
    let shown_url = if database_url.starts_with("sqlite:") {
        database_url.clone()
    } else {
        "(REEVE_DATABASE_URL)".to_owned()
    };
    let stripe = match &fake_stripe {
        Some(fake) => format!(
            "fake, at {} (no STRIPE_SECRET_KEY set: test mode, no real money)",
            fake.api_base()
        ),
        None => "Stripe API (STRIPE_SECRET_KEY is set)".to_owned(),
    };
    println!("Reeve is up.");
    println!("  store        {store}: {shown_url}");
    println!("  REST API     http://{http}   (OpenAPI /openapi.json, /healthz, /readyz, /metrics)");
    println!(
        "  credits-svc  grpc://{}   (reflection on; /metrics over HTTP)",
        credits.local_addr
    );
    println!("  quota-svc    grpc://{}", quota.local_addr);
    println!("  Stripe       {stripe}");
    if fake_stripe.is_some() {
        println!(
            "  auto top-up  PUT /api/credits/auto-topup; save a card with a purchase {{\"save_payment_method\": true}}, then pay its checkout URL + /pay?payment_method=pm_card_visa (or pm_card_chargeDeclined, pm_card_authenticationRequired)"
        );
    }
    if !generated.is_empty() {
        println!(
            "  dev defaults {} (generated secrets are kept in {})",
            generated.join(", "),
            data_dir.join("dev-secrets.toml").display()
        );
    }
    println!(
        "  dev token    reeve dev-token <user-id>   (e.g. curl -H \"Authorization: Bearer $(reeve dev-token alice)\" http://{http}/api/credits/balance)"
    );
    if config::var("REEVE_JWT_HS256_SECRET")?.is_some() {
        let token = dev::mint_token(DEMO_USER, 86_400)?;
        println!(
            "  billing page {}   (signed in as {DEMO_USER} for a day; any user: reeve dev-token <user-id> --link)",
            dev::billing_link(http, &token)
        );
    }
    println!(
        "listening http={http} credits={} quota={} stripe={}",
        credits.local_addr,
        quota.local_addr,
        fake_stripe
            .as_ref()
            .map(|f| f.local_addr.to_string())
            .unwrap_or_else(|| "-".to_owned())
    );

    let signal = CancellationToken::new();
    reeve_runtime::shutdown::cancel_on_signal(signal.clone());
    signal.cancelled().await;
    tracing::info!("shutting down: draining the REST API first");
    front.cancel();
    if tokio::time::timeout(DRAIN_DEADLINE, bridge.wait())
        .await
        .is_err()
    {
        tracing::warn!("webhook-bridge did not drain within the deadline");
    }
    services.cancel();
    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        tokio::join!(credits.wait(), quota.wait())
    })
    .await;
    match drained {
        Ok((Ok(()), Ok(()))) => {}
        Ok((credits, quota)) => tracing::warn!(?credits, ?quota, "a service ended with an error"),
        Err(_) => tracing::warn!("the gRPC services did not drain within the deadline"),
    }
    telemetry::shutdown();
    println!("Reeve stopped.");
    Ok(())
}

/// Opens each service's store on `REEVE_DATABASE_URL`, which applies its migrations.
pub async fn migrate() -> anyhow::Result<()> {
    telemetry::init_with("reeve", LogFormat::Pretty)?;
    let url = config::var("REEVE_DATABASE_URL")?
        .ok_or_else(|| ConfigError::new("REEVE_DATABASE_URL", "is required"))?;
    credits_svc::store::open(&url).await?;
    quota_svc::store::open(&url, 1).await?;
    webhook_bridge::stripe::events::EventStore::open(&url).await?;
    reeve_events::EventStore::open(&url).await?;
    let target = if url.starts_with("sqlite:") {
        url.clone()
    } else {
        "PostgreSQL (REEVE_DATABASE_URL)".to_owned()
    };
    println!("migrations applied (credits, quota, stripe events) to {target}");
    Ok(())
}
