//! A Stripe stand-in on loopback, for tests and for `reeve up` without a Stripe key.
//!
//! It answers the one API call Reeve makes (`POST /v1/checkout/sessions`) with a
//! Stripe-shaped session whose URL is local; "paying" it (any GET or POST on that URL)
//! sends correctly signed `checkout.session.completed` and
//! `payment_intent.succeeded` webhooks to the configured endpoint, retrying like Stripe
//! while the endpoint answers non-2xx. `POST /v1/refunds` and
//! `POST /v1/test_helpers/disputes` send `charge.refunded` and `charge.dispute.created`
//! the same way. It keeps everything in memory and must never be used with real money.

// The checkout session object is one large json! literal.
#![recursion_limit = "256"]

pub mod objects;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::objects::Session;

/// Header value of `Stripe-Signature` for `payload` signed at `timestamp` (Unix seconds).
pub fn sign(payload: &str, secret: &str, timestamp: i64) -> String {
    stripe_webhook::Webhook::generate_test_header(payload, secret, Some(timestamp))
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    /// Where webhooks go, e.g. `http://127.0.0.1:8080/api/credits/webhook`; may be
    /// set later with [`FakeStripe::set_webhook_url`] (the receiver may start after).
    pub webhook_url: String,
    /// The endpoint's signing secret (`whsec_…`).
    pub webhook_secret: String,
}

/// One paid checkout: what a refund or dispute refers to.
#[derive(Debug, Clone)]
struct Payment {
    charge_id: String,
    amount: i64,
    amount_refunded: i64,
    currency: String,
}

struct FakeState {
    config: Config,
    webhook_url: Mutex<String>,
    base_url: String,
    http: reqwest::Client,
    sessions: Mutex<HashMap<String, Session>>,
    payments: Mutex<HashMap<String, Payment>>,
}

/// A running fake.
pub struct FakeStripe {
    pub local_addr: SocketAddr,
    state: Arc<FakeState>,
    task: JoinHandle<std::io::Result<()>>,
}

impl FakeStripe {
    /// The API base to hand to a Stripe client (`STRIPE_API_BASE`), ending in '/'.
    pub fn api_base(&self) -> String {
        format!("http://{}/", self.local_addr)
    }

    /// Points webhooks at `url` from now on.
    pub fn set_webhook_url(&self, url: impl Into<String>) {
        *lock(&self.state.webhook_url) = url.into();
    }

    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await??;
        Ok(())
    }
}

pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<FakeStripe> {
    let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
    let local_addr = listener.local_addr()?;
    let state = Arc::new(FakeState {
        webhook_url: Mutex::new(config.webhook_url.clone()),
        config,
        base_url: format!("http://{local_addr}"),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        sessions: Mutex::new(HashMap::new()),
        payments: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/v1/checkout/sessions", post(create_session))
        .route("/v1/checkout/sessions/{id}", get(retrieve_session))
        // "Paying" is any GET or POST on the checkout URL (or its /pay).
        .route("/checkout/{id}", get(pay).post(pay))
        .route("/checkout/{id}/pay", get(pay).post(pay))
        .route("/v1/refunds", post(refund))
        .route("/v1/test_helpers/disputes", post(dispute))
        .with_state(Arc::clone(&state));
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    tracing::info!(%local_addr, "fake Stripe serving (no real money)");
    Ok(FakeStripe {
        local_addr,
        state,
        task,
    })
}

fn random_id(prefix: &str) -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    let tail: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}_test_{tail}")
}

/// Stripe's error body.
fn stripe_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"type": kind, "message": message}})),
    )
        .into_response()
}

/// Stripe answers 401 without a secret key; so does the fake.
fn has_key(headers: &HeaderMap) -> bool {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    key.starts_with("sk_") || key.starts_with("rk_")
}

fn invalid_key() -> Response {
    stripe_error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "Invalid API Key provided",
    )
}

/// Form fields as Stripe's bracket notation sends them, e.g. `line_items[0][quantity]`.
type Fields = Vec<(String, String)>;

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The `prefix[key]=value` pairs of a metadata hash.
fn metadata(fields: &Fields, prefix: &str) -> serde_json::Map<String, Value> {
    fields
        .iter()
        .filter_map(|(k, v)| {
            let key = k
                .strip_prefix(prefix)?
                .strip_prefix('[')?
                .strip_suffix(']')?;
            Some((key.to_owned(), Value::String(v.clone())))
        })
        .collect()
}

async fn create_session(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    if !has_key(&headers) {
        return invalid_key();
    }
    if field(&fields, "mode") != Some("payment") {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the fake supports mode=payment only",
        );
    }
    let unit_amount = field(&fields, "line_items[0][price_data][unit_amount]")
        .and_then(|v| v.parse::<i64>().ok());
    let quantity = field(&fields, "line_items[0][quantity]")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(1);
    let currency = field(&fields, "line_items[0][price_data][currency]")
        .unwrap_or("usd")
        .to_owned();
    let Some(amount_total) = unit_amount
        .and_then(|a| a.checked_mul(quantity))
        .filter(|a| *a > 0)
    else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "line_items[0] needs a positive price_data.unit_amount",
        );
    };
    let id = random_id("cs");
    let session = Session {
        url: format!("{}/checkout/{id}", state.base_url),
        id: id.clone(),
        created: now_secs(),
        amount_total,
        currency,
        client_reference_id: field(&fields, "client_reference_id").map(str::to_owned),
        metadata: metadata(&fields, "metadata"),
        payment_intent_metadata: metadata(&fields, "payment_intent_data[metadata]"),
        success_url: field(&fields, "success_url").map(str::to_owned),
        cancel_url: field(&fields, "cancel_url").map(str::to_owned),
        payment_intent: None,
    };
    let body = session.to_json();
    lock(&state.sessions).insert(id, session);
    Json(body).into_response()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn retrieve_session(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !has_key(&headers) {
        return invalid_key();
    }
    match lock(&state.sessions).get(&id) {
        Some(session) => Json(session.to_json()).into_response(),
        None => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "No such checkout.session",
        ),
    }
}

/// Pays a session: the payment intent and charge come into being and both webhooks are
/// delivered (in Stripe's usual order) before the answer. Paying a paid session again
/// answers the same payment and sends nothing. A browser (`Accept: text/html`) gets a
/// page linking to the success URL; anything else gets JSON.
async fn pay(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (session, newly_paid) = {
        let mut sessions = lock(&state.sessions);
        let Some(session) = sessions.get_mut(&id) else {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "no such checkout session"})),
            )
                .into_response();
        };
        let newly_paid = session.payment_intent.is_none();
        if newly_paid {
            let payment_intent = random_id("pi");
            lock(&state.payments).insert(
                payment_intent.clone(),
                Payment {
                    charge_id: random_id("ch"),
                    amount: session.amount_total,
                    amount_refunded: 0,
                    currency: session.currency.clone(),
                },
            );
            session.payment_intent = Some(payment_intent);
        }
        (session.clone(), newly_paid)
    };
    let payment_intent = session.payment_intent.clone().unwrap_or_default();
    let charge_id = lock(&state.payments)
        .get(&payment_intent)
        .map(|p| p.charge_id.clone())
        .unwrap_or_default();
    let browser = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if !newly_paid {
        return paid_answer(
            browser,
            &session,
            &payment_intent,
            &charge_id,
            true,
            Vec::new(),
        );
    }
    let now = now_secs();
    let completed = objects::event(
        &random_id("evt"),
        "checkout.session.completed",
        session.to_json(),
        None,
        now,
    );
    let intent = objects::payment_intent(
        &payment_intent,
        &charge_id,
        session.amount_total,
        &session.currency,
        &session.payment_intent_metadata,
        now,
    );
    let succeeded = objects::event(
        &random_id("evt"),
        "payment_intent.succeeded",
        intent,
        None,
        now,
    );
    let mut deliveries = Vec::new();
    for event in [completed, succeeded] {
        deliveries.push(deliver(&state, event).await);
    }
    paid_answer(
        browser,
        &session,
        &payment_intent,
        &charge_id,
        false,
        deliveries,
    )
}

fn paid_answer(
    browser: bool,
    session: &Session,
    payment_intent: &str,
    charge_id: &str,
    already_paid: bool,
    deliveries: Vec<Value>,
) -> Response {
    if browser {
        let next = session.success_url.as_deref().unwrap_or("/");
        return Html(format!(
            "<!doctype html><title>Fake Stripe checkout</title><h1>Paid (test mode, no real money)</h1>\
             <p>Session <code>{}</code>, payment <code>{payment_intent}</code>.</p><p><a href=\"{next}\">Continue</a></p>",
            session.id
        ))
        .into_response();
    }
    Json(json!({
        "session_id": session.id,
        "payment_intent": payment_intent,
        "charge": charge_id,
        "amount": session.amount_total,
        "currency": session.currency,
        "already_paid": already_paid,
        "success_url": session.success_url,
        "deliveries": deliveries,
    }))
    .into_response()
}

/// The paid payment intent a refund or dispute request names (secret key checked).
fn requested_payment(
    state: &FakeState,
    headers: &HeaderMap,
    fields: &Fields,
) -> Result<String, Box<Response>> {
    if !has_key(headers) {
        return Err(Box::new(invalid_key()));
    }
    let Some(payment_intent) = field(fields, "payment_intent") else {
        return Err(Box::new(stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "payment_intent is required",
        )));
    };
    if !lock(&state.payments).contains_key(payment_intent) {
        return Err(Box::new(no_such_payment()));
    }
    Ok(payment_intent.to_owned())
}

fn no_such_payment() -> Response {
    stripe_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "No such payment_intent",
    )
}

/// `POST /v1/refunds` with `payment_intent` and an optional `amount` (default: the rest).
async fn refund(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    let payment_intent = match requested_payment(&state, &headers, &fields) {
        Ok(payment_intent) => payment_intent,
        Err(refused) => return *refused,
    };
    let requested = field(&fields, "amount").map(|v| v.parse::<i64>());
    let (payment, previous) = {
        let mut payments = lock(&state.payments);
        let Some(payment) = payments.get_mut(&payment_intent) else {
            return no_such_payment();
        };
        let left = payment.amount - payment.amount_refunded;
        let amount = match requested {
            None => left,
            Some(Ok(amount)) if amount > 0 && amount <= left => amount,
            Some(_) => {
                return stripe_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "amount must be 1 to what is left",
                );
            }
        };
        let previous = payment.amount_refunded;
        payment.amount_refunded += amount;
        (payment.clone(), previous)
    };
    let now = now_secs();
    let refund_id = random_id("re");
    let charge = objects::charge(
        &payment.charge_id,
        &payment_intent,
        payment.amount,
        payment.amount_refunded,
        &payment.currency,
        now,
    );
    let previous_refunded = previous;
    let previous = json!({"amount_refunded": previous_refunded, "refunded": false});
    let event = objects::event(
        &random_id("evt"),
        "charge.refunded",
        charge,
        Some(previous),
        now,
    );
    let delivery = deliver(&state, event).await;
    Json(json!({
        "id": refund_id,
        "object": "refund",
        "amount": payment.amount_refunded - previous_refunded,
        "charge": payment.charge_id,
        "payment_intent": payment_intent,
        "currency": payment.currency,
        "status": "succeeded",
        "delivery": delivery,
    }))
    .into_response()
}

/// `POST /v1/test_helpers/disputes` with `payment_intent`: the cardholder disputes the
/// whole charge.
async fn dispute(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    let payment_intent = match requested_payment(&state, &headers, &fields) {
        Ok(payment_intent) => payment_intent,
        Err(refused) => return *refused,
    };
    let Some(payment) = lock(&state.payments).get(&payment_intent).cloned() else {
        return no_such_payment();
    };
    let now = now_secs();
    let dispute_id = random_id("dp");
    let dispute = json!({
        "id": dispute_id,
        "object": "dispute",
        "amount": payment.amount,
        "balance_transactions": [],
        "charge": payment.charge_id,
        "created": now,
        "currency": payment.currency,
        "enhanced_eligibility_types": [],
        "evidence": {},
        "evidence_details": {"due_by": now + 7 * 24 * 3600, "has_evidence": false, "past_due": false, "submission_count": 0},
        "is_charge_refundable": false,
        "livemode": false,
        "metadata": {},
        "payment_intent": payment_intent,
        "payment_method_details": null,
        "reason": "fraudulent",
        "status": "needs_response"
    });
    let event = objects::event(
        &random_id("evt"),
        "charge.dispute.created",
        dispute.clone(),
        None,
        now,
    );
    let delivery = deliver(&state, event).await;
    Json(json!({"dispute": dispute, "delivery": delivery})).into_response()
}

/// Sends one signed event, retrying (up to 6 attempts, backing off) while the endpoint
/// answers non-2xx or cannot be reached. Returns the last status (0: unreachable).
async fn deliver(state: &FakeState, event: Value) -> Value {
    let payload = event.to_string();
    let event_type = event.get("type").cloned().unwrap_or(Value::Null);
    let event_id = event.get("id").cloned().unwrap_or(Value::Null);
    let mut status = 0u16;
    for attempt in 0..6u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
        }
        let signature = sign(&payload, &state.config.webhook_secret, now_secs());
        let url = lock(&state.webhook_url).clone();
        let sent = state
            .http
            .post(url)
            .header("stripe-signature", signature)
            .header(header::CONTENT_TYPE, "application/json")
            .body(payload.clone())
            .send()
            .await;
        status = sent.map(|r| r.status().as_u16()).unwrap_or(0);
        if (200..300).contains(&status) {
            break;
        }
        tracing::warn!(%event_type, status, attempt, "webhook delivery failed; retrying");
    }
    json!({"id": event_id, "type": event_type, "status": status})
}
