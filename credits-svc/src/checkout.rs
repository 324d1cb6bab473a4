//! Starting a purchase: a Stripe Checkout Session for a whole number of credits.
//!
//! This module only asks Stripe for a payment page; it never credits anything. Credits
//! arrive when Stripe confirms the payment (`payment_intent.succeeded`, received by the
//! bridge and applied through `AddCredits` keyed by the payment intent id), so an
//! abandoned or repeated checkout moves no money. The user id travels in the payment
//! intent's metadata, where the webhook reads it back.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use reeve_runtime::Micros;
use reeve_runtime::config::{self, ConfigError};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionCustomerCreation, CreateCheckoutSessionLineItems,
    CreateCheckoutSessionLineItemsPriceData, CreateCheckoutSessionPaymentIntentData,
    CreateCheckoutSessionPaymentIntentDataSetupFutureUsage, ProductData,
};

pub const DEFAULT_API_BASE: &str = "https://api.stripe.com/";
pub const DEFAULT_PURCHASE_MIN: i64 = 5;
pub const DEFAULT_PURCHASE_MAX: i64 = 1_000;
/// The largest purchase Stripe can take in one payment, in whole credits.
pub const MAX_PURCHASE_CREDITS: i64 = 999_999;
pub const DEFAULT_SUCCESS_URL: &str = "http://localhost:3000/credits?checkout=success";
pub const DEFAULT_CANCEL_URL: &str = "http://localhost:3000/credits?checkout=cancel";

/// How purchases are made; absent when no `STRIPE_SECRET_KEY` is configured.
#[derive(Clone)]
pub struct CheckoutConfig {
    /// `STRIPE_SECRET_KEY`; never printed.
    pub secret_key: secrecy::SecretString,
    /// `STRIPE_API_BASE`, ending in '/'.
    pub api_base: String,
    /// `REEVE_PURCHASE_MIN` / `REEVE_PURCHASE_MAX`: whole credits per purchase.
    pub min_credits: i64,
    pub max_credits: i64,
    /// `REEVE_CHECKOUT_SUCCESS_URL` / `REEVE_CHECKOUT_CANCEL_URL`.
    pub success_url: String,
    pub cancel_url: String,
    /// `REEVE_CURRENCY`: the one currency credits are sold in (lower-case ISO code).
    pub currency: String,
}

impl fmt::Debug for CheckoutConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckoutConfig")
            .field("secret_key", &"<redacted>")
            .field("api_base", &self.api_base)
            .field("min_credits", &self.min_credits)
            .field("max_credits", &self.max_credits)
            .field("success_url", &self.success_url)
            .field("cancel_url", &self.cancel_url)
            .field("currency", &self.currency)
            .finish()
    }
}

/// Checks that `url` is an absolute http(s) URL, naming `variable` otherwise.
pub fn check_url(variable: &'static str, url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| ConfigError::new(variable, "must be an absolute http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(ConfigError::new(
            variable,
            "must be an absolute http:// or https:// URL with a host",
        ));
    }
    Ok(())
}

impl CheckoutConfig {
    /// Reads the purchase settings; `None` when `STRIPE_SECRET_KEY` is unset.
    pub fn from_env() -> Result<Option<CheckoutConfig>, ConfigError> {
        let Some(secret_key) = config::var("STRIPE_SECRET_KEY")? else {
            return Ok(None);
        };
        let mut api_base =
            config::var("STRIPE_API_BASE")?.unwrap_or_else(|| DEFAULT_API_BASE.to_owned());
        check_url("STRIPE_API_BASE", &api_base)?;
        if !api_base.ends_with('/') {
            api_base.push('/');
        }
        let min_credits = config::parse_or("REEVE_PURCHASE_MIN", DEFAULT_PURCHASE_MIN)?;
        let max_credits = config::parse_or("REEVE_PURCHASE_MAX", DEFAULT_PURCHASE_MAX)?;
        if min_credits < 1 {
            return Err(ConfigError::new(
                "REEVE_PURCHASE_MIN",
                "must be at least 1 (whole credits)",
            ));
        }
        // Stripe takes at most 99,999,999 minor units (cents) per payment.
        if max_credits < min_credits || max_credits > MAX_PURCHASE_CREDITS {
            return Err(ConfigError::new(
                "REEVE_PURCHASE_MAX",
                format!("must be between REEVE_PURCHASE_MIN and {MAX_PURCHASE_CREDITS}"),
            ));
        }
        let success_url = config::var("REEVE_CHECKOUT_SUCCESS_URL")?
            .unwrap_or_else(|| DEFAULT_SUCCESS_URL.to_owned());
        check_url("REEVE_CHECKOUT_SUCCESS_URL", &success_url)?;
        let cancel_url = config::var("REEVE_CHECKOUT_CANCEL_URL")?
            .unwrap_or_else(|| DEFAULT_CANCEL_URL.to_owned());
        check_url("REEVE_CHECKOUT_CANCEL_URL", &cancel_url)?;
        let currency = config::currency()?;
        Ok(Some(CheckoutConfig {
            secret_key: secret_key.into(),
            api_base,
            min_credits,
            max_credits,
            success_url,
            cancel_url,
            currency,
        }))
    }
}

/// Why a purchase could not be started.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("purchases are disabled: this server has no STRIPE_SECRET_KEY")]
    Disabled,
    #[error("amount must be a whole number of credits from {min} to {max}, got {got}")]
    OutOfRange { min: i64, max: i64, got: i64 },
    #[error("Stripe could not be reached: {0}")]
    Unavailable(String),
    #[error("Stripe refused the checkout session: {0}")]
    Refused(String),
}

/// Creates Checkout Sessions through async-stripe.
pub struct Checkout {
    config: Option<CheckoutConfig>,
    client: Option<stripe::Client>,
}

/// Whether a checkout saves the card it is paid with, for auto top-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardSaving {
    No,
    /// Saved for a new Stripe customer (`customer_creation = always`).
    NewCustomer,
    /// Saved for the user's existing Stripe customer.
    Customer(String),
}

/// A created session: where the user pays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub session_id: String,
    pub checkout_url: String,
    pub amount: Micros,
}

impl Checkout {
    pub fn new(config: Option<CheckoutConfig>) -> Result<Checkout, ConfigError> {
        let client = match &config {
            None => None,
            Some(config) => Some(
                stripe::ClientBuilder::new(secrecy::ExposeSecret::expose_secret(
                    &config.secret_key,
                ))
                .url(config.api_base.clone())
                .timeout(Duration::from_secs(20))
                .build()
                .map_err(|e| ConfigError::new("STRIPE_API_BASE", e.to_string()))?,
            ),
        };
        Ok(Checkout { config, client })
    }

    /// The purchase settings, when purchases are enabled.
    pub fn config(&self) -> Option<&CheckoutConfig> {
        self.config.as_ref()
    }

    pub async fn start(
        &self,
        user_id: &str,
        amount_credits: i64,
        saving: CardSaving,
    ) -> Result<Started, CheckoutError> {
        let (Some(config), Some(client)) = (&self.config, &self.client) else {
            return Err(CheckoutError::Disabled);
        };
        if !(config.min_credits..=config.max_credits).contains(&amount_credits) {
            return Err(CheckoutError::OutOfRange {
                min: config.min_credits,
                max: config.max_credits,
                got: amount_credits,
            });
        }
        let amount = Micros::from_credits(amount_credits).ok_or(CheckoutError::OutOfRange {
            min: config.min_credits,
            max: config.max_credits,
            got: amount_credits,
        })?;
        // Credits are sold one per USD: amount × 100 cents, as one line item.
        let unit_amount_cents = amount_credits * 100;
        let currency: stripe_types::Currency = config
            .currency
            .parse()
            .unwrap_or(stripe_types::Currency::USD);
        let mut price = CreateCheckoutSessionLineItemsPriceData::new(currency);
        price.unit_amount = Some(unit_amount_cents);
        price.product_data = Some(ProductData::new(format!("{amount_credits} Reeve credits")));
        let mut line_item = CreateCheckoutSessionLineItems::new();
        line_item.price_data = Some(price);
        line_item.quantity = Some(1);
        let metadata = HashMap::from([("user_id".to_owned(), user_id.to_owned())]);
        let mut payment_intent_data = CreateCheckoutSessionPaymentIntentData::new();
        payment_intent_data.metadata = Some(metadata.clone());
        if saving != CardSaving::No {
            // The card is kept for off-session charges (auto top-up); the payment's
            // webhook then names the customer and the payment method to save.
            payment_intent_data.setup_future_usage =
                Some(CreateCheckoutSessionPaymentIntentDataSetupFutureUsage::OffSession);
        }
        let mut request = CreateCheckoutSession::new()
            .mode(stripe_checkout::CheckoutSessionMode::Payment)
            .client_reference_id(user_id)
            .line_items(vec![line_item])
            .payment_intent_data(payment_intent_data)
            .metadata(metadata)
            .success_url(config.success_url.clone())
            .cancel_url(config.cancel_url.clone());
        match saving {
            CardSaving::No => {}
            CardSaving::NewCustomer => {
                request = request.customer_creation(CreateCheckoutSessionCustomerCreation::Always);
            }
            CardSaving::Customer(customer) => request = request.customer(customer),
        }
        let session = request.send(client).await.map_err(|error| match error {
            stripe::StripeError::Stripe(errors, status) => CheckoutError::Refused(format!(
                "HTTP {status}: {}",
                errors.message.unwrap_or_default()
            )),
            other => CheckoutError::Unavailable(other.to_string()),
        })?;
        let checkout_url = session
            .url
            .ok_or_else(|| CheckoutError::Refused("the session has no checkout URL".to_owned()))?;
        Ok(Started {
            session_id: session.id.to_string(),
            checkout_url,
            amount,
        })
    }
}
