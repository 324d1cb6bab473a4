//! `GET /billing`: the billing page a product's user sees — balance, buying credits,
//! usage against the tier's limits, history — as one HTML page with its stylesheet and
//! script, embedded in the binary (no build step, no external assets: it works offline).
//!
//! The page holds no secret and no user data: it is the same for everyone, and the
//! user's JWT reaches only the script (in the URL fragment, which browsers never send),
//! which calls the REST API with it. This module must never read a token, log one, or
//! accept one in a query string.

use std::sync::Arc;

use axum::Router;
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use reeve_runtime::config;

use crate::AppState;

const PAGE_HTML: &str = include_str!("../billing/page.html");
const PAGE_CSS: &str = include_str!("../billing/page.css");
const PAGE_JS: &str = include_str!("../billing/page.js");

/// The purchase bounds credits-svc applies by default (`REEVE_PURCHASE_MIN` /
/// `REEVE_PURCHASE_MAX`); credits-svc stays the judge, and its refusal is explained.
const DEFAULT_PURCHASE_MIN: i64 = 5;
const DEFAULT_PURCHASE_MAX: i64 = 1_000;

/// Only this origin's script, style and API; no framing, no referrer, no plugin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

/// The page's routes: `/billing` and its two assets.
pub fn routes() -> Router<Arc<AppState>> {
    let html = page_html(purchase_bounds());
    Router::new()
        .route(
            "/billing",
            get(move || {
                let html = html.clone();
                async move { asset("text/html; charset=utf-8", html) }
            }),
        )
        .route(
            "/billing/page.css",
            get(|| async { asset("text/css; charset=utf-8", PAGE_CSS.to_owned()) }),
        )
        .route(
            "/billing/page.js",
            get(|| async { asset("text/javascript; charset=utf-8", PAGE_JS.to_owned()) }),
        )
}

/// The bounds the purchase form offers: the same variables credits-svc reads (one
/// configuration for every process), their defaults when unset or unreadable.
fn purchase_bounds() -> (i64, i64) {
    let min = config::parse_or("REEVE_PURCHASE_MIN", DEFAULT_PURCHASE_MIN)
        .unwrap_or(DEFAULT_PURCHASE_MIN)
        .max(1);
    let max = config::parse_or("REEVE_PURCHASE_MAX", DEFAULT_PURCHASE_MAX)
        .unwrap_or(DEFAULT_PURCHASE_MAX)
        .max(min);
    (min, max)
}

fn page_html((min, max): (i64, i64)) -> String {
    PAGE_HTML
        .replace("{{PURCHASE_MIN}}", &min.to_string())
        .replace("{{PURCHASE_MAX}}", &max.to_string())
}

fn asset(content_type: &'static str, body: String) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_the_bounds_and_no_placeholder() {
        let html = page_html((7, 700));
        assert!(html.contains("min=\"7\"") && html.contains("max=\"700\""));
        assert!(!html.contains("{{"));
    }

    #[test]
    fn the_page_loads_nothing_from_another_origin() {
        for text in [PAGE_HTML, PAGE_CSS, PAGE_JS] {
            assert!(!text.contains("http://") && !text.contains("https://"));
            assert!(!text.contains("@import") && !text.contains("url("));
        }
    }

    #[test]
    fn the_script_never_puts_the_token_in_a_url_or_a_log() {
        assert!(!PAGE_JS.contains("console."));
        assert!(!PAGE_JS.contains("?token") && !PAGE_JS.contains("&token"));
        assert!(PAGE_JS.contains("history.replaceState"));
    }
}
