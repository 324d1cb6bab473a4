//! `GET /api/credits/history.csv`: the signed-in user's whole history as CSV (RFC 4180,
//! CRLF, UTF-8), newest first, for spreadsheets and accountants. Money is the ledger's
//! exact decimal string (six places), never a float.
//!
//! The first page is read before the answer starts, so a bad token or a backend outage
//! is a proper JSON error; later pages stream, and a failure there cuts the download
//! (the client sees an incomplete transfer, never a silently short file).
//!
//! Text cells that a spreadsheet would run as a formula (starting with `=`, `+`, `-`,
//! `@`, tab or carriage return) get a leading `'`, as OWASP recommends against CSV
//! injection; amounts are numbers and are left as they are.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use reeve_proto::credits::v1 as pb;
use reeve_runtime::Micros;

use crate::AppState;
use crate::auth::User;
use crate::error::ApiError;
use crate::routes::credits::kind_name;
use crate::routes::timestamp;

/// Entries asked of credits-svc per page (its largest page).
const PAGE_SIZE: i32 = 500;

pub const HEADER: &str = "id,created_at,kind,amount,balance_after,description,idempotency_key\r\n";

#[utoipa::path(get, path = "/api/credits/history.csv", tag = "credits",
    responses((status = 200, description = "The whole history, newest first: a header line, then one line per entry (id, created_at RFC 3339 UTC, kind, amount and balance_after as exact decimal credits with six places, description, idempotency_key); RFC 4180 quoting; text cells starting with = + - @ get a leading '.", content_type = "text/csv", body = String),
        (status = 401, body = crate::openapi::ErrorBody)),
    security(("user_jwt" = [])))]
pub async fn download(
    State(state): State<Arc<AppState>>,
    User(user_id): User,
) -> Result<Response, ApiError> {
    let first = page(&state, &user_id, String::new()).await?;
    let mut head = String::from(HEADER);
    let next = rows(&mut head, first);
    let rest = futures::stream::unfold(
        (next, state, user_id),
        |(token, state, user_id)| async move {
            let token = token?;
            match page(&state, &user_id, token).await {
                Ok(reply) => {
                    let mut chunk = String::new();
                    let next = rows(&mut chunk, reply);
                    Some((Ok(Bytes::from(chunk)), (next, state, user_id)))
                }
                Err(error) => {
                    tracing::warn!(code = error.code(), "history CSV cut short");
                    Some((
                        Err(std::io::Error::other(error.to_string())),
                        (None, state, user_id),
                    ))
                }
            }
        },
    );
    let body = futures::stream::once(async move { Ok(Bytes::from(head)) }).chain(rest);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"credits-history.csv\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

async fn page(
    state: &AppState,
    user_id: &str,
    page_token: String,
) -> Result<pb::HistoryResponse, ApiError> {
    Ok(state
        .credits()
        .history(pb::HistoryRequest {
            user_id: user_id.to_owned(),
            page_size: PAGE_SIZE,
            page_token,
        })
        .await?
        .into_inner())
}

/// Appends one line per entry; the next page's token, if any.
fn rows(out: &mut String, reply: pb::HistoryResponse) -> Option<String> {
    for entry in reply.entries {
        row(out, &entry);
    }
    Some(reply.next_page_token).filter(|t| !t.is_empty())
}

fn row(out: &mut String, entry: &pb::LedgerEntry) {
    let created_at = entry.created_at.map(timestamp).unwrap_or_default();
    let cells = [
        entry.id.to_string(),
        created_at,
        kind_name(entry.kind).to_owned(),
        Micros(entry.amount_micros).to_string(),
        Micros(entry.balance_after_micros).to_string(),
        text_cell(&entry.description),
        text_cell(&entry.idempotency_key),
    ];
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&quoted(cell));
    }
    out.push_str("\r\n");
}

/// Free text, defused for spreadsheets: a cell that would start a formula gets a `'`.
fn text_cell(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    }
}

/// RFC 4180: a cell holding a comma, quote, line break or edge space is quoted, its
/// quotes doubled.
fn quoted(cell: &str) -> String {
    let needs_quotes =
        cell.contains([',', '"', '\r', '\n']) || cell.starts_with(' ') || cell.ends_with(' ');
    if needs_quotes {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(amount_micros: i64, description: &str) -> pb::LedgerEntry {
        pb::LedgerEntry {
            id: 7,
            user_id: "alice".to_owned(),
            kind: pb::EntryKind::Deduction as i32,
            amount_micros,
            balance_after_micros: 1_234_567_891,
            idempotency_key: "call-1".to_owned(),
            description: description.to_owned(),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_790_000_000,
                nanos: 1_000,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn money_is_the_exact_decimal_string() {
        let mut out = String::new();
        row(&mut out, &entry(-12_500, "gpt call"));
        assert_eq!(
            out,
            "7,2026-09-21T14:13:20.000001Z,deduction,-0.012500,1234.567891,gpt call,call-1\r\n"
        );
    }

    #[test]
    fn commas_quotes_and_line_breaks_are_quoted() {
        let mut out = String::new();
        row(&mut out, &entry(-1, "a, \"b\"\nc"));
        assert!(out.contains(",\"a, \"\"b\"\"\nc\","), "{out}");
    }

    #[test]
    fn formulas_are_defused_but_amounts_stay_numbers() {
        let mut out = String::new();
        row(&mut out, &entry(-1_000_000, "=HYPERLINK(\"x\")"));
        assert!(out.contains(",-1.000000,"), "{out}");
        assert!(out.contains(",\"'=HYPERLINK(\"\"x\"\")\","), "{out}");
        assert_eq!(text_cell("@sum"), "'@sum");
        assert_eq!(text_cell("plain"), "plain");
    }
}
