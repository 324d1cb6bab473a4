//! A Stripe stand-in on loopback, for tests and for `reeve up` without a Stripe key.
//!
//! It answers the one API call Reeve makes (`POST /v1/checkout/sessions`) with a
//! Stripe-shaped session whose URL is local; "paying" it (any GET or POST on that URL)
//! sends correctly signed `checkout.session.completed` and
//! `payment_intent.succeeded` webhooks to the configured endpoint, retrying like Stripe
//! while the endpoint answers non-2xx. `POST /v1/refunds` and
//! `POST /v1/test_helpers/disputes` send `charge.refunded` and `charge.dispute.created`
//! the same way. It keeps everything in memory and must never be used with real money.
//!
//! For reconciliation it also lists what it made, as Stripe does (`GET
//! /v1/payment_intents`, `/v1/refunds`, `/v1/disputes`: newest first, `limit`,
//! `starting_after`, `created[gte|gt|lte|lt]`, `has_more`), retrieves payment intents
//! and charges, closes disputes (`POST /v1/test_helpers/disputes/{id}/close` with
//! `outcome=won|lost`: a won dispute sends `charge.dispute.funds_reinstated`), and can
//! drop webhooks ([`FakeStripe::set_webhooks`], or `POST
//! /v1/test_helpers/webhooks/{on|off}`) and deliver the dropped ones later
//! ([`FakeStripe::deliver_dropped`], `POST /v1/test_helpers/webhooks/deliver_dropped`):
//! payments Stripe knows and the ledger does not.
//!
//! For auto top-up it learns customers and saved cards from Checkout Sessions created
//! with `setup_future_usage`, and takes off-session `POST /v1/payment_intents` with
//! test cards that succeed, decline or require action (see [`cards`]).

// The checkout session object is one large json! literal.
#![recursion_limit = "256"]

pub mod cards;
pub mod objects;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
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
    /// What the list endpoints answer, in creation order.
    listed: Mutex<Listed>,
    /// Off: events are kept in `dropped` instead of being sent.
    webhooks: AtomicBool,
    dropped: Mutex<Vec<Value>>,
    /// Customers, saved cards and off-session payments ([`cards`]).
    cards: Mutex<cards::Cards>,
    /// How long `POST /v1/payment_intents` waits after charging before it answers
    /// (a test kills the caller in between).
    answer_delay: Mutex<Duration>,
}

/// Objects as the list and retrieve endpoints answer them, oldest first.
#[derive(Default)]
struct Listed {
    payment_intents: Vec<Value>,
    charges: Vec<Value>,
    refunds: Vec<Value>,
    disputes: Vec<Value>,
}

impl Listed {
    fn of(&mut self, kind: Kind) -> &mut Vec<Value> {
        match kind {
            Kind::PaymentIntents => &mut self.payment_intents,
            Kind::Charges => &mut self.charges,
            Kind::Refunds => &mut self.refunds,
            Kind::Disputes => &mut self.disputes,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    PaymentIntents,
    Charges,
    Refunds,
    Disputes,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::PaymentIntents => "/v1/payment_intents",
            Kind::Charges => "/v1/charges",
            Kind::Refunds => "/v1/refunds",
            Kind::Disputes => "/v1/disputes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::PaymentIntents => "payment_intent",
            Kind::Charges => "charge",
            Kind::Refunds => "refund",
            Kind::Disputes => "dispute",
        }
    }
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

    /// Sends webhooks (`true`, the default) or keeps them undelivered (`false`), as an
    /// endpoint that is down for longer than Stripe retries would see.
    pub fn set_webhooks(&self, on: bool) {
        self.state.webhooks.store(on, Ordering::SeqCst);
    }

    /// Delivers the events dropped while webhooks were off, oldest first (late
    /// webhooks); one delivery report per event.
    pub async fn deliver_dropped(&self) -> Vec<Value> {
        deliver_dropped_events(&self.state).await
    }

    /// Every off-session payment intent created so far (replays of an idempotency key
    /// are not new ones), oldest first.
    pub fn off_session_payment_intents(&self) -> Vec<Value> {
        lock(&self.state.cards).off_session_created.clone()
    }

    /// How many `POST /v1/payment_intents` were answered from a saved idempotency key.
    pub fn idempotent_replays(&self) -> u64 {
        lock(&self.state.cards).replays
    }

    /// The customer and test card of a saved payment method (`pm_…`).
    pub fn saved_card(&self, payment_method: &str) -> Option<cards::SavedCard> {
        lock(&self.state.cards)
            .payment_methods
            .get(payment_method)
            .cloned()
    }

    /// Makes `POST /v1/payment_intents` wait `delay` after charging before answering.
    pub fn set_answer_delay(&self, delay: Duration) {
        *lock(&self.state.answer_delay) = delay;
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
        listed: Mutex::new(Listed::default()),
        webhooks: AtomicBool::new(true),
        dropped: Mutex::new(Vec::new()),
        cards: Mutex::new(cards::Cards::default()),
        answer_delay: Mutex::new(Duration::ZERO),
    });
    let app = Router::new()
        .route("/v1/checkout/sessions", post(create_session))
        .route("/v1/checkout/sessions/{id}", get(retrieve_session))
        // "Paying" is any GET or POST on the checkout URL (or its /pay).
        .route("/checkout/{id}", get(pay).post(pay))
        .route("/checkout/{id}/pay", get(pay).post(pay))
        .route("/v1/refunds", post(refund).get(list_refunds))
        .route("/v1/test_helpers/disputes", post(dispute))
        .route("/v1/test_helpers/disputes/{id}/close", post(close_dispute))
        .route("/v1/test_helpers/payment_intents", post(direct_payment))
        .route("/v1/test_helpers/webhooks/on", post(webhooks_on))
        .route("/v1/test_helpers/webhooks/off", post(webhooks_off))
        .route(
            "/v1/test_helpers/webhooks/deliver_dropped",
            post(deliver_dropped),
        )
        .route(
            "/v1/payment_intents",
            get(list_payment_intents).post(create_payment_intent),
        )
        .route("/v1/test_helpers/customers", post(create_test_customer))
        .route("/authenticate/{id}", get(authenticate).post(authenticate))
        .route(
            "/authenticate/{id}/fail",
            get(fail_authentication).post(fail_authentication),
        )
        .route("/v1/payment_intents/{id}", get(retrieve_payment_intent))
        .route("/v1/charges/{id}", get(retrieve_charge))
        .route("/v1/disputes", get(list_disputes))
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
    let setup = cards::SessionSetup {
        setup_future_usage: field(&fields, "payment_intent_data[setup_future_usage]")
            .map(str::to_owned),
        customer: field(&fields, "customer").map(str::to_owned),
        customer_creation: field(&fields, "customer_creation").map(str::to_owned),
    };
    if let Some(customer) = &setup.customer
        && !lock(&state.cards).customers.contains_key(customer)
    {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("No such customer: '{customer}'"),
        );
    }
    let body = session.to_json();
    lock(&state.cards).sessions.insert(id.clone(), setup);
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
    Query(query): Query<Fields>,
) -> Response {
    let test_card = field(&query, "payment_method")
        .unwrap_or("pm_card_visa")
        .to_owned();
    let Some(behaviour) = cards::CardBehaviour::of_test_card(&test_card) else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "payment_method must be a test card: pm_card_visa, pm_card_chargeDeclined, pm_card_chargeCustomerFail or pm_card_authenticationRequired",
        );
    };
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
    let mut intent = objects::payment_intent(
        &payment_intent,
        &charge_id,
        session.amount_total,
        &session.currency,
        &session.payment_intent_metadata,
        now,
    );
    save_card(&state, &session.id, &test_card, behaviour, &mut intent);
    record_payment(&state, intent.clone(), &charge_id, &payment_intent, now);
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
    let refund = json!({
        "id": refund_id,
        "object": "refund",
        "amount": payment.amount_refunded - previous_refunded,
        "balance_transaction": null,
        "charge": payment.charge_id,
        "created": now,
        "currency": payment.currency,
        "metadata": {},
        "payment_intent": payment_intent,
        "reason": null,
        "receipt_number": null,
        "source_transfer_reversal": null,
        "status": "succeeded",
        "transfer_reversal": null,
    });
    {
        let mut listed = lock(&state.listed);
        listed.refunds.push(refund.clone());
        replace(&mut listed.charges, charge.clone());
    }
    let previous = json!({"amount_refunded": previous_refunded, "refunded": false});
    let event = objects::event(
        &random_id("evt"),
        "charge.refunded",
        charge,
        Some(previous),
        now,
    );
    let delivery = deliver(&state, event).await;
    let mut answer = refund;
    answer["delivery"] = delivery;
    Json(answer).into_response()
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
    let status = field(&fields, "status")
        .unwrap_or("needs_response")
        .to_owned();
    if !DISPUTE_OPEN_STATUSES.contains(&status.as_str()) {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "status must be needs_response, under_review, warning_needs_response or warning_under_review",
        );
    }
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
        "status": status
    });
    lock(&state.listed).disputes.push(dispute.clone());
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
/// With webhooks off the event is kept for [`FakeStripe::deliver_dropped`] instead
/// (status `"dropped"`).
async fn deliver(state: &FakeState, event: Value) -> Value {
    if !state.webhooks.load(Ordering::SeqCst) {
        let answer = json!({"id": event.get("id"), "type": event.get("type"), "status": "dropped"});
        lock(&state.dropped).push(event);
        return answer;
    }
    send(state, event).await
}

async fn send(state: &FakeState, event: Value) -> Value {
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

/// Dispute statuses a test may open a dispute with (`warning_*`: an inquiry).
const DISPUTE_OPEN_STATUSES: [&str; 4] = [
    "needs_response",
    "under_review",
    "warning_needs_response",
    "warning_under_review",
];

/// Replaces the object with the same id (or appends it).
fn replace(objects: &mut Vec<Value>, object: Value) {
    match objects.iter_mut().find(|o| o.get("id") == object.get("id")) {
        Some(slot) => *slot = object,
        None => objects.push(object),
    }
}

/// Keeps a new payment intent and its charge for the list and retrieve endpoints.
fn record_payment(
    state: &FakeState,
    intent: Value,
    charge_id: &str,
    payment_intent: &str,
    now: i64,
) {
    let (amount, currency) = (
        intent.get("amount").and_then(Value::as_i64).unwrap_or(0),
        intent
            .get("currency")
            .and_then(Value::as_str)
            .unwrap_or("usd")
            .to_owned(),
    );
    let charge = objects::charge(charge_id, payment_intent, amount, 0, &currency, now);
    let mut listed = lock(&state.listed);
    listed.payment_intents.push(intent);
    listed.charges.push(charge);
}

async fn deliver_dropped_events(state: &FakeState) -> Vec<Value> {
    let events = std::mem::take(&mut *lock(&state.dropped));
    let mut deliveries = Vec::with_capacity(events.len());
    for event in events {
        deliveries.push(send(state, event).await);
    }
    deliveries
}

async fn webhooks_on(State(state): State<Arc<FakeState>>) -> Response {
    state.webhooks.store(true, Ordering::SeqCst);
    Json(json!({"webhooks": "on"})).into_response()
}

async fn webhooks_off(State(state): State<Arc<FakeState>>) -> Response {
    state.webhooks.store(false, Ordering::SeqCst);
    Json(json!({"webhooks": "off"})).into_response()
}

async fn deliver_dropped(State(state): State<Arc<FakeState>>) -> Response {
    let deliveries = deliver_dropped_events(&state).await;
    Json(json!({"deliveries": deliveries})).into_response()
}

/// `POST /v1/test_helpers/payment_intents` with `amount`, `currency` (default usd) and
/// `metadata[…]`: a payment that succeeded without a checkout (its
/// `payment_intent.succeeded` is sent as for a paid session).
async fn direct_payment(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    if !has_key(&headers) {
        return invalid_key();
    }
    let Some(amount) = field(&fields, "amount")
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|a| *a > 0)
    else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "amount must be a positive integer",
        );
    };
    let currency = field(&fields, "currency").unwrap_or("usd").to_owned();
    let payment_intent = random_id("pi");
    let charge_id = random_id("ch");
    lock(&state.payments).insert(
        payment_intent.clone(),
        Payment {
            charge_id: charge_id.clone(),
            amount,
            amount_refunded: 0,
            currency: currency.clone(),
        },
    );
    let now = now_secs();
    let intent = objects::payment_intent(
        &payment_intent,
        &charge_id,
        amount,
        &currency,
        &metadata(&fields, "metadata"),
        now,
    );
    record_payment(&state, intent.clone(), &charge_id, &payment_intent, now);
    let event = objects::event(
        &random_id("evt"),
        "payment_intent.succeeded",
        intent.clone(),
        None,
        now,
    );
    let delivery = deliver(&state, event).await;
    let mut answer = intent;
    answer["delivery"] = delivery;
    Json(answer).into_response()
}

/// `POST /v1/test_helpers/disputes/{id}/close` with `outcome=won|lost`. A won dispute
/// that withdrew funds sends `charge.dispute.funds_reinstated`; an inquiry closes as
/// `warning_closed`; every close sends `charge.dispute.closed`.
async fn close_dispute(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(fields): Form<Fields>,
) -> Response {
    if !has_key(&headers) {
        return invalid_key();
    }
    let won = match field(&fields, "outcome") {
        Some("won") => true,
        Some("lost") => false,
        _ => {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "outcome must be won or lost",
            );
        }
    };
    let (dispute, inquiry) = {
        let mut listed = lock(&state.listed);
        let Some(dispute) = listed
            .disputes
            .iter_mut()
            .find(|d| d.get("id").and_then(Value::as_str) == Some(id.as_str()))
        else {
            return stripe_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "No such dispute",
            );
        };
        let status = dispute.get("status").and_then(Value::as_str).unwrap_or("");
        let inquiry = status.starts_with("warning_");
        if matches!(status, "won" | "lost" | "warning_closed") {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the dispute is already closed",
            );
        }
        dispute["status"] = json!(match (inquiry, won) {
            (true, _) => "warning_closed",
            (false, true) => "won",
            (false, false) => "lost",
        });
        (dispute.clone(), inquiry)
    };
    let now = now_secs();
    let mut deliveries = Vec::new();
    if won && !inquiry {
        let event = objects::event(
            &random_id("evt"),
            "charge.dispute.funds_reinstated",
            dispute.clone(),
            None,
            now,
        );
        deliveries.push(deliver(&state, event).await);
    }
    let closed = objects::event(
        &random_id("evt"),
        "charge.dispute.closed",
        dispute.clone(),
        None,
        now,
    );
    deliveries.push(deliver(&state, closed).await);
    Json(json!({"dispute": dispute, "deliveries": deliveries})).into_response()
}

async fn list_payment_intents(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Query(query): Query<Fields>,
) -> Response {
    list(&state, &headers, &query, Kind::PaymentIntents)
}

async fn list_refunds(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Query(query): Query<Fields>,
) -> Response {
    list(&state, &headers, &query, Kind::Refunds)
}

async fn list_disputes(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Query(query): Query<Fields>,
) -> Response {
    list(&state, &headers, &query, Kind::Disputes)
}

async fn retrieve_payment_intent(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    retrieve(&state, &headers, &id, Kind::PaymentIntents)
}

async fn retrieve_charge(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    retrieve(&state, &headers, &id, Kind::Charges)
}

fn retrieve(state: &FakeState, headers: &HeaderMap, id: &str, kind: Kind) -> Response {
    if !has_key(headers) {
        return invalid_key();
    }
    let found = lock(&state.listed)
        .of(kind)
        .iter()
        .find(|o| o.get("id").and_then(Value::as_str) == Some(id))
        .cloned();
    match found {
        Some(object) => Json(object).into_response(),
        None => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            &format!("No such {}: '{id}'", kind.name()),
        ),
    }
}

/// Stripe's list: newest first, `limit` 1 to 100 (default 10), `starting_after` an id
/// of the previous page, `created[gte|gt|lte|lt]` (or `created=`), and for refunds and
/// disputes `payment_intent` / `charge`.
fn list(state: &FakeState, headers: &HeaderMap, query: &Fields, kind: Kind) -> Response {
    if !has_key(headers) {
        return invalid_key();
    }
    let bad =
        |message: &str| stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", message);
    let limit = match field(query, "limit").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(limit)) if (1..=100).contains(&limit) => limit,
        Some(_) => return bad("limit must be an integer from 1 to 100"),
    };
    let mut bounds: Vec<(&str, i64)> = Vec::new();
    for name in [
        "created[gte]",
        "created[gt]",
        "created[lte]",
        "created[lt]",
        "created",
    ] {
        if let Some(value) = field(query, name) {
            match value.parse::<i64>() {
                Ok(at) => bounds.push((name, at)),
                Err(_) => return bad("created bounds must be Unix timestamps"),
            }
        }
    }
    let filters: Vec<(&str, &str)> = ["payment_intent", "charge"]
        .into_iter()
        .filter_map(|name| field(query, name).map(|v| (name, v)))
        .collect();
    let matching: Vec<Value> = {
        let mut listed = lock(&state.listed);
        listed
            .of(kind)
            .iter()
            .rev()
            .filter(|o| {
                let created = o.get("created").and_then(Value::as_i64).unwrap_or(0);
                bounds.iter().all(|(name, at)| match *name {
                    "created[gte]" => created >= *at,
                    "created[gt]" => created > *at,
                    "created[lte]" => created <= *at,
                    "created[lt]" => created < *at,
                    _ => created == *at,
                }) && filters
                    .iter()
                    .all(|(name, value)| o.get(*name).and_then(Value::as_str) == Some(*value))
            })
            .cloned()
            .collect()
    };
    let start = match field(query, "starting_after") {
        None => 0,
        Some(after) => match matching
            .iter()
            .position(|o| o.get("id").and_then(Value::as_str) == Some(after))
        {
            Some(at) => at + 1,
            None => return bad("starting_after is not an object of this list"),
        },
    };
    let page: Vec<Value> = matching.iter().skip(start).take(limit).cloned().collect();
    let has_more = matching.len() > start + page.len();
    Json(json!({
        "object": "list",
        "url": kind.path(),
        "has_more": has_more,
        "data": page,
    }))
    .into_response()
}

/// Saves the card a session is paid with when the session asked for it (see
/// [`cards`]): the customer (given or created) and a new payment method go into the
/// payment intent as Stripe reports them.
fn save_card(
    state: &FakeState,
    session_id: &str,
    test_card: &str,
    behaviour: cards::CardBehaviour,
    intent: &mut Value,
) {
    let mut cards = lock(&state.cards);
    let Some(setup) = cards.sessions.get(session_id).cloned() else {
        return;
    };
    if !setup.saves_card() {
        return;
    }
    let customer = setup.customer.clone().unwrap_or_else(|| random_id("cus"));
    let payment_method = random_id("pm");
    cards
        .customers
        .entry(customer.clone())
        .or_default()
        .push(payment_method.clone());
    cards.payment_methods.insert(
        payment_method.clone(),
        cards::SavedCard {
            customer: customer.clone(),
            behaviour,
            test_card: test_card.to_owned(),
        },
    );
    intent["customer"] = json!(customer);
    intent["payment_method"] = json!(payment_method);
    intent["setup_future_usage"] = json!(setup.setup_future_usage);
}

/// `POST /v1/test_helpers/customers` with `payment_method` (a test card, default
/// `pm_card_visa`): a customer with that card saved, as a paid Checkout with
/// `setup_future_usage` leaves one. Answers `{"customer", "payment_method"}`.
async fn create_test_customer(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    if !has_key(&headers) {
        return invalid_key();
    }
    let test_card = field(&fields, "payment_method").unwrap_or("pm_card_visa");
    let Some(behaviour) = cards::CardBehaviour::of_test_card(test_card) else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "payment_method must be a test card",
        );
    };
    let customer = random_id("cus");
    let payment_method = random_id("pm");
    let mut cards = lock(&state.cards);
    cards
        .customers
        .insert(customer.clone(), vec![payment_method.clone()]);
    cards.payment_methods.insert(
        payment_method.clone(),
        cards::SavedCard {
            customer: customer.clone(),
            behaviour,
            test_card: test_card.to_owned(),
        },
    );
    Json(json!({"customer": customer, "payment_method": payment_method})).into_response()
}

/// `POST /v1/payment_intents`: an off-session payment with a saved card, confirmed at
/// once (`off_session=true`, `confirm=true`), honouring `Idempotency-Key`.
async fn create_payment_intent(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    Form(fields): Form<Fields>,
) -> Response {
    if !has_key(&headers) {
        return invalid_key();
    }
    let bad =
        |message: &str| stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", message);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut sorted = fields.clone();
    sorted.sort();
    let fingerprint = serde_json::to_string(&sorted).unwrap_or_default();
    let now = now_secs();
    // Decided and remembered under one lock, so a concurrent request with the same key
    // sees the first answer.
    let (status, body, webhook) = {
        let mut cards = lock(&state.cards);
        if let Some(key) = &key
            && let Some(answered) = cards.idempotency.get(key).cloned()
        {
            if answered.fingerprint != fingerprint {
                return stripe_error(
                    StatusCode::BAD_REQUEST,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                );
            }
            cards.replays += 1;
            let status =
                StatusCode::from_u16(answered.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (
                status,
                [("idempotent-replayed", "true")],
                Json(answered.body),
            )
                .into_response();
        }
        if field(&fields, "confirm") != Some("true")
            || field(&fields, "off_session") != Some("true")
        {
            return bad("the fake supports off_session=true with confirm=true only");
        }
        let Some(amount) = field(&fields, "amount")
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|a| *a > 0)
        else {
            return bad("amount must be a positive integer");
        };
        let currency = field(&fields, "currency").unwrap_or("usd").to_owned();
        let (Some(customer), Some(payment_method)) =
            (field(&fields, "customer"), field(&fields, "payment_method"))
        else {
            return bad("customer and payment_method are required off-session");
        };
        let Some(card) = cards.payment_methods.get(payment_method).cloned() else {
            return bad(&format!("No such PaymentMethod: '{payment_method}'"));
        };
        if card.customer != customer {
            return bad("The provided PaymentMethod is not attached to this customer");
        }
        let payment_intent = random_id("pi");
        let charge_id = random_id("ch");
        let mut intent = objects::payment_intent(
            &payment_intent,
            &charge_id,
            amount,
            &currency,
            &metadata(&fields, "metadata"),
            now,
        );
        intent["customer"] = json!(customer);
        intent["payment_method"] = json!(payment_method);
        let (status, body, webhook) = match card.behaviour {
            cards::CardBehaviour::Succeeds => {
                lock(&state.payments).insert(
                    payment_intent.clone(),
                    Payment {
                        charge_id: charge_id.clone(),
                        amount,
                        amount_refunded: 0,
                        currency: currency.clone(),
                    },
                );
                record_payment(&state, intent.clone(), &charge_id, &payment_intent, now);
                (
                    200,
                    intent.clone(),
                    Some(("payment_intent.succeeded", intent.clone())),
                )
            }
            cards::CardBehaviour::Declines => {
                let declined = cards::declined_body(&payment_intent, payment_method);
                intent["status"] = json!("requires_payment_method");
                intent["amount_received"] = json!(0);
                intent["latest_charge"] = Value::Null;
                intent["last_payment_error"] = declined["error"].clone();
                // Stripe answers the request and sends payment_intent.payment_failed.
                (
                    402,
                    declined,
                    Some(("payment_intent.payment_failed", intent.clone())),
                )
            }
            cards::CardBehaviour::RequiresAction => {
                intent["status"] = json!("requires_action");
                intent["amount_received"] = json!(0);
                intent["latest_charge"] = Value::Null;
                intent["next_action"] = json!({
                    "type": "redirect_to_url",
                    "redirect_to_url": {
                        "return_url": null,
                        "url": format!("{}/authenticate/{payment_intent}", state.base_url),
                    },
                });
                cards
                    .awaiting_action
                    .insert(payment_intent.clone(), intent.clone());
                (200, intent.clone(), None)
            }
        };
        cards.off_session_created.push(intent);
        if let Some(key) = key {
            cards.idempotency.insert(
                key,
                cards::Answered {
                    fingerprint,
                    status,
                    body: body.clone(),
                },
            );
        }
        (status, body, webhook)
    };
    if let Some((event_type, intent)) = webhook {
        let event = objects::event(&random_id("evt"), event_type, intent, None, now);
        deliver(&state, event).await;
    }
    let delay = *lock(&state.answer_delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

/// The customer fails the authentication of a payment intent that required it: as
/// Stripe does, the intent goes back to `requires_payment_method` with a
/// `payment_intent_authentication_failure` error, and `payment_intent.payment_failed`
/// is sent. The intent can no longer be authenticated.
async fn fail_authentication(
    State(state): State<Arc<FakeState>>,
    Path(id): Path<String>,
) -> Response {
    let Some(mut intent) = lock(&state.cards).awaiting_action.remove(&id) else {
        return no_such_payment();
    };
    intent["status"] = json!("requires_payment_method");
    intent["next_action"] = Value::Null;
    intent["last_payment_error"] = json!({
        "type": "card_error",
        "code": "payment_intent_authentication_failure",
        "message": "The provided PaymentMethod has failed authentication. You can provide payment_method_data or a new PaymentMethod to attempt to fulfill this PaymentIntent again.",
        "doc_url": "https://stripe.com/docs/error-codes/payment-intent-authentication-failure",
        "payment_method": {"id": intent.get("payment_method").cloned().unwrap_or(Value::Null), "object": "payment_method"},
    });
    let event = objects::event(
        &random_id("evt"),
        "payment_intent.payment_failed",
        intent.clone(),
        None,
        now_secs(),
    );
    let delivery = deliver(&state, event).await;
    Json(json!({"payment_intent": intent, "delivery": delivery})).into_response()
}

/// The customer completes the authentication of a payment intent that required it:
/// it succeeds and `payment_intent.succeeded` is sent.
async fn authenticate(State(state): State<Arc<FakeState>>, Path(id): Path<String>) -> Response {
    let Some(mut intent) = lock(&state.cards).awaiting_action.remove(&id) else {
        return no_such_payment();
    };
    let now = now_secs();
    let amount = intent.get("amount").and_then(Value::as_i64).unwrap_or(0);
    let currency = intent
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or("usd")
        .to_owned();
    let charge_id = random_id("ch");
    intent["status"] = json!("succeeded");
    intent["amount_received"] = json!(amount);
    intent["latest_charge"] = json!(charge_id);
    intent["next_action"] = Value::Null;
    lock(&state.payments).insert(
        id.clone(),
        Payment {
            charge_id: charge_id.clone(),
            amount,
            amount_refunded: 0,
            currency,
        },
    );
    record_payment(&state, intent.clone(), &charge_id, &id, now);
    let event = objects::event(
        &random_id("evt"),
        "payment_intent.succeeded",
        intent.clone(),
        None,
        now,
    );
    let delivery = deliver(&state, event).await;
    Json(json!({"payment_intent": intent, "delivery": delivery})).into_response()
}
