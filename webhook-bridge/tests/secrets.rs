//! Secrets are never `Debug`-printed: every config that holds one (the bridge's service
//! token, JWT HS256 secret and Stripe webhook secret, the services' accepted tokens,
//! credits-svc's Stripe secret key) formats without it, whatever `{:?}` or `{:#?}` a
//! log line or a panic uses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use reeve_runtime::auth::{Scope, ServiceTokens};
use webhook_bridge::auth::JwtKey;

const SERVICE_TOKEN: &str = "svc_SECRET_service_token_1";
const ACCEPTED_TOKEN: &str = "svc_SECRET_accepted_token_2";
const SCOPED_TOKEN: &str = "svc_SECRET_scoped_token_3";
const JWT_SECRET: &str = "jwt_SECRET_hs256_of_enough_bytes";
const WEBHOOK_SECRET: &str = "whsec_SECRET_webhook";
const STRIPE_KEY: &str = "sk_live_SECRET_stripe_key";
const DATABASE_PASSWORD: &str = "pw_SECRET_database";

fn assert_hidden(what: &str, formatted: &str) {
    for secret in [
        SERVICE_TOKEN,
        ACCEPTED_TOKEN,
        SCOPED_TOKEN,
        JWT_SECRET,
        WEBHOOK_SECRET,
        STRIPE_KEY,
        DATABASE_PASSWORD,
    ] {
        assert!(
            !formatted.contains(secret),
            "{what} shows {secret}: {formatted}"
        );
    }
    assert!(
        !formatted.contains("SECRET"),
        "{what} shows a secret: {formatted}"
    );
}

fn tokens() -> ServiceTokens {
    ServiceTokens::new([ACCEPTED_TOKEN]).with_token("gateway", SCOPED_TOKEN, &[Scope::Deduct])
}

fn bridge_config(jwt: JwtKey) -> webhook_bridge::Config {
    webhook_bridge::Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        credits_url: "http://127.0.0.1:50051".to_owned(),
        quota_url: "http://127.0.0.1:50052".to_owned(),
        service_tokens: tokens(),
        service_token: SERVICE_TOKEN.into(),
        jwt,
        jwt_audience: Some("reeve".to_owned()),
        jwt_issuer: None,
        webhook_secret: WEBHOOK_SECRET.into(),
        database_url: format!("postgres://reeve:{DATABASE_PASSWORD}@db/reeve"),
        currency: "usd".to_owned(),
    }
}

#[test]
fn the_bridge_config_never_shows_its_secrets() {
    let config = bridge_config(JwtKey::Hs256(JWT_SECRET.into()));
    assert_hidden("bridge Config {:?}", &format!("{config:?}"));
    assert_hidden("bridge Config {:#?}", &format!("{config:#?}"));
    assert_hidden("JwtKey", &format!("{:?}", config.jwt));
    assert_hidden("a clone", &format!("{:?}", config.clone()));
    // The fields that are not secret are still there to read.
    let formatted = format!("{config:?}");
    assert!(formatted.contains("127.0.0.1:50051"), "{formatted}");
    assert!(formatted.contains("reeve"), "{formatted}");
}

#[test]
fn accepted_service_tokens_never_show() {
    assert_hidden("ServiceTokens", &format!("{:?}", tokens()));
    assert_hidden("ServiceTokens {:#?}", &format!("{:#?}", tokens()));
}

#[test]
fn the_credits_config_never_shows_the_stripe_key() {
    let config = credits_svc::Config {
        database_url: format!("postgres://reeve:{DATABASE_PASSWORD}@db/reeve"),
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        service_tokens: tokens(),
        deduct_workers: None,
        lot_sweep_interval: std::time::Duration::from_secs(60),
        clock: reeve_runtime::clock::Clock::system(),
        checkout: Some(credits_svc::checkout::CheckoutConfig {
            secret_key: STRIPE_KEY.into(),
            api_base: "https://api.stripe.com/".to_owned(),
            min_credits: 5,
            max_credits: 1_000,
            success_url: "http://localhost:3000/ok".to_owned(),
            cancel_url: "http://localhost:3000/cancel".to_owned(),
            currency: "usd".to_owned(),
        }),
    };
    let formatted = format!("{config:?}");
    assert!(!formatted.contains(DATABASE_PASSWORD), "{formatted}");
    assert_hidden("credits Config", &formatted);
}
