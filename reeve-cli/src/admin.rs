//! Admin commands: one gRPC call each to a running credits-svc or quota-svc
//! (`REEVE_CREDITS_ADDR`, `REEVE_QUOTA_ADDR`, token `REEVE_SERVICE_TOKEN`), printed as a
//! table or, with `--json`, as one JSON document.

use reeve_client::connect::{RawCreditsClient, RawQuotaClient};
use reeve_client::{ClientBuilder, ConnectError, Connection, SecretString};
use reeve_proto::credits::v1 as credits;
use reeve_proto::quota::v1 as quota;
use reeve_runtime::Micros;
use reeve_runtime::auth::BearerToken;
use reeve_runtime::config::{self, ConfigError};
use serde_json::{Value, json};
use webhook_bridge::routes::credits::{Entry, kind_name};
use webhook_bridge::routes::lots::Lot;

pub struct Output {
    pub json: bool,
}

impl Output {
    fn print(&self, document: Value, table: Vec<Vec<String>>) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&document).unwrap_or_default()
            );
            return;
        }
        let columns = table.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                table
                    .iter()
                    .filter_map(|row| row.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &table {
            let line: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
                .collect();
            println!("{}", line.join("  ").trim_end());
        }
    }
}

fn token() -> Result<SecretString, ConfigError> {
    let token = match config::var("REEVE_SERVICE_TOKEN")? {
        Some(token) => token,
        None => config::var("REEVE_SERVICE_TOKENS")?
            .and_then(|list| {
                list.split(',')
                    .map(str::trim)
                    .find(|t| !t.is_empty())
                    .map(str::to_owned)
            })
            .ok_or_else(|| {
                ConfigError::new(
                    "REEVE_SERVICE_TOKEN",
                    "is required (or run `reeve up` here once)",
                )
            })?,
    };
    BearerToken::new(token.trim())
        .map_err(|_| ConfigError::new("REEVE_SERVICE_TOKEN", "must be printable ASCII"))?;
    Ok(SecretString::from(token.trim().to_owned()))
}

/// A connection through reeve-client's builder (the token never printed).
async fn connect(variable: &'static str, default: &str) -> anyhow::Result<Connection> {
    let url = webhook_bridge::grpc_url(
        variable,
        &config::var(variable)?.unwrap_or_else(|| default.to_owned()),
    )?;
    ClientBuilder::new(url.clone())
        .service_token(token()?)
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| match e {
            ConnectError::InvalidToken | ConnectError::MissingToken => {
                ConfigError::new("REEVE_SERVICE_TOKEN", "must be printable ASCII").into()
            }
            ConnectError::InvalidAddress { reason, .. } => {
                ConfigError::new(variable, format!("is not a host:port or URL: {reason}")).into()
            }
            other => {
                anyhow::anyhow!("cannot reach {url} ({variable}): {other}; is `reeve up` running?")
            }
        })
}

pub(crate) async fn credits_client() -> anyhow::Result<RawCreditsClient> {
    Ok(
        connect("REEVE_CREDITS_ADDR", webhook_bridge::DEFAULT_CREDITS_ADDR)
            .await?
            .raw_credits(),
    )
}

async fn quota_client() -> anyhow::Result<RawQuotaClient> {
    Ok(
        connect("REEVE_QUOTA_ADDR", webhook_bridge::DEFAULT_QUOTA_ADDR)
            .await?
            .raw_quota(),
    )
}

/// A gRPC refusal as a one-line error.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// A fresh idempotency key, announced before the call: re-running with `--key` and it
/// after a timeout cannot apply the write twice.
fn new_key(prefix: &str) -> String {
    let key = format!("{prefix}-{:016x}", rand::random::<u64>());
    eprintln!("idempotency key {key} (to retry safely, run again with --key {key})");
    key
}

fn timestamp(at: Option<prost_types::Timestamp>) -> String {
    at.map(webhook_bridge::routes::timestamp)
        .unwrap_or_default()
}

/// An entry as the REST API shows it (draws included), so `--json` reads the same.
fn entry_json(entry: &credits::LedgerEntry) -> Value {
    serde_json::to_value(Entry::from(entry.clone())).unwrap_or_default()
}

/// An entry's draws in one cell: `lot 3: 1.500000, lot 4: 0.500000`.
fn draws_text(entry: &credits::LedgerEntry) -> String {
    entry
        .draws
        .iter()
        .map(|d| format!("lot {}: {}", d.lot_id, Micros(d.amount_micros)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn written(
    out: &Output,
    entry: Option<credits::LedgerEntry>,
    duplicate: bool,
) -> anyhow::Result<()> {
    let entry = entry.ok_or_else(|| anyhow::anyhow!("credits-svc returned no entry"))?;
    let status = if duplicate {
        "already applied (same key)"
    } else {
        "applied"
    };
    out.print(
        json!({"entry": entry_json(&entry), "duplicate": duplicate}),
        vec![
            vec!["status".into(), status.into()],
            vec!["user".into(), entry.user_id.clone()],
            vec!["amount".into(), Micros(entry.amount_micros).to_string()],
            vec![
                "balance".into(),
                Micros(entry.balance_after_micros).to_string(),
            ],
            vec!["key".into(), entry.idempotency_key.clone()],
        ],
    );
    Ok(())
}

pub async fn balance(out: &Output, user_id: String) -> anyhow::Result<()> {
    let reply = credits_client()
        .await?
        .get_balance(credits::GetBalanceRequest { user_id })
        .await
        .map_err(refused)?
        .into_inner();
    let balance = Micros(reply.balance_micros).to_string();
    let paid = Micros(reply.paid_micros).to_string();
    let promotional = Micros(reply.promotional_micros).to_string();
    let next_expiry = reply.next_expiry_at.map(|at| {
        (
            webhook_bridge::routes::timestamp(at),
            Micros(reply.next_expiry_micros).to_string(),
        )
    });
    let next_expiry_text = next_expiry
        .as_ref()
        .map(|(at, amount)| format!("{amount} at {at}"))
        .unwrap_or_else(|| "-".to_owned());
    let next_expiry = next_expiry.map(|(at, amount)| {
        json!({"at": at, "amount": amount, "amount_micros": reply.next_expiry_micros})
    });
    out.print(
        json!({
            "user_id": reply.user_id, "balance": balance, "balance_micros": reply.balance_micros,
            "paid": paid, "paid_micros": reply.paid_micros,
            "promotional": promotional, "promotional_micros": reply.promotional_micros,
            "next_expiry": next_expiry,
        }),
        vec![
            ["user", "balance", "paid", "promotional", "next_expiry"]
                .map(String::from)
                .to_vec(),
            vec![reply.user_id, balance, paid, promotional, next_expiry_text],
        ],
    );
    Ok(())
}

/// The lot a grant makes: `--paid` (else promotional), `--priority`, `--expires`.
pub struct GrantTerms {
    pub paid: bool,
    pub priority: Option<i32>,
    pub expires: Option<String>,
}

pub async fn grant(
    out: &Output,
    user_id: String,
    amount: &str,
    key: Option<String>,
    reason: String,
    terms: GrantTerms,
) -> anyhow::Result<()> {
    let amount =
        Micros::parse_positive_credits(amount).map_err(|e| anyhow::anyhow!("amount: {e}"))?;
    let expires_at = terms
        .expires
        .as_deref()
        .map(webhook_bridge::routes::lots::expires_at)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
    // Unspecified: the ledger's default for grants (promotional).
    let category = if terms.paid {
        credits::CreditCategory::Paid
    } else {
        credits::CreditCategory::Unspecified
    };
    let reply = credits_client()
        .await?
        .add_credits(credits::AddCreditsRequest {
            user_id,
            amount_micros: amount.0,
            idempotency_key: key.unwrap_or_else(|| new_key("grant")),
            kind: credits::CreditKind::Grant.into(),
            description: reason,
            category: category.into(),
            priority: terms.priority,
            expires_at,
        })
        .await
        .map_err(refused)?
        .into_inner();
    written(out, reply.entry, reply.duplicate)
}

pub async fn adjust(
    out: &Output,
    user_id: String,
    amount: &str,
    key: Option<String>,
    reason: String,
) -> anyhow::Result<()> {
    let amount: Micros = amount.parse().map_err(|e| anyhow::anyhow!("amount: {e}"))?;
    let reply = credits_client()
        .await?
        .adjust(credits::AdjustRequest {
            user_id,
            amount_micros: amount.0,
            idempotency_key: key.unwrap_or_else(|| new_key("adjust")),
            reason,
        })
        .await
        .map_err(refused)?
        .into_inner();
    written(out, reply.entry, reply.duplicate)
}

pub async fn history(
    out: &Output,
    user_id: String,
    limit: i32,
    cursor: Option<String>,
) -> anyhow::Result<()> {
    let reply = credits_client()
        .await?
        .history(credits::HistoryRequest {
            user_id,
            page_size: limit,
            page_token: cursor.unwrap_or_default(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let mut table = vec![
        [
            "id",
            "created_at",
            "kind",
            "amount",
            "balance_after",
            "key",
            "description",
            "draws",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for e in &reply.entries {
        table.push(vec![
            e.id.to_string(),
            timestamp(e.created_at),
            kind_name(e.kind).to_owned(),
            Micros(e.amount_micros).to_string(),
            Micros(e.balance_after_micros).to_string(),
            e.idempotency_key.clone(),
            e.description.clone(),
            draws_text(e),
        ]);
    }
    if !reply.next_page_token.is_empty() {
        table.push(vec![format!("(more: --cursor {})", reply.next_page_token)]);
    }
    let entries: Vec<Value> = reply.entries.iter().map(entry_json).collect();
    let next = Some(reply.next_page_token).filter(|t| !t.is_empty());
    out.print(json!({"entries": entries, "next_cursor": next}), table);
    Ok(())
}

/// A user's lots in spending order: the live ones, or every one with `all`.
pub async fn lots(out: &Output, user_id: String, all: bool) -> anyhow::Result<()> {
    let reply = credits_client()
        .await?
        .list_lots(credits::ListLotsRequest {
            user_id: user_id.clone(),
            include_spent: all,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let lots: Vec<Lot> = reply.lots.into_iter().map(Lot::from).collect();
    let mut table = vec![
        [
            "id",
            "category",
            "priority",
            "remaining",
            "original",
            "expires_at",
            "source",
            "created_at",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for lot in &lots {
        table.push(vec![
            lot.id.to_string(),
            lot.category.clone(),
            lot.priority.to_string(),
            lot.remaining.clone(),
            lot.original.clone(),
            lot.expires_at.clone().unwrap_or_else(|| "never".to_owned()),
            lot.source.clone(),
            lot.created_at.clone(),
        ]);
    }
    out.print(json!({"user_id": user_id, "lots": lots}), table);
    Ok(())
}

pub async fn set_tier(out: &Output, user_id: String, tier: String) -> anyhow::Result<()> {
    let reply = quota_client()
        .await?
        .set_tier(quota::SetTierRequest { user_id, tier })
        .await
        .map_err(refused)?
        .into_inner();
    out.print(
        json!({"user_id": reply.user_id, "tier": reply.tier, "previous_tier": reply.previous_tier}),
        vec![
            vec!["user".into(), "tier".into(), "previous".into()],
            vec![reply.user_id, reply.tier, reply.previous_tier],
        ],
    );
    Ok(())
}

fn limit_text(limit: Option<&quota::Limit>) -> String {
    match limit {
        Some(quota::Limit {
            unlimited: false,
            units,
        }) => units.to_string(),
        _ => "unlimited".to_owned(),
    }
}

pub async fn usage(out: &Output, user_id: String) -> anyhow::Result<()> {
    let reply = quota_client()
        .await?
        .get_usage(quota::GetUsageRequest { user_id })
        .await
        .map_err(refused)?
        .into_inner();
    let mut table = vec![vec![format!(
        "user {} (tier {})",
        reply.user_id, reply.tier
    )]];
    table.push(
        ["feature", "limit", "used", "remaining", "next_free_at"]
            .map(String::from)
            .to_vec(),
    );
    let mut features = Vec::new();
    for f in &reply.features {
        let unlimited = f.limit.as_ref().is_none_or(|l| l.unlimited);
        let limit = limit_text(f.limit.as_ref());
        let limit = if f.overridden {
            format!("{limit} (override)")
        } else {
            limit
        };
        table.push(vec![
            f.feature.clone(),
            limit,
            f.used.to_string(),
            if unlimited {
                "-".to_owned()
            } else {
                f.remaining.to_string()
            },
            timestamp(f.next_free_at),
        ]);
        features.push(json!({
            "feature": f.feature,
            "limit": if unlimited { Value::Null } else { json!(f.limit.as_ref().map(|l| l.units)) },
            "unlimited": unlimited,
            "used": f.used,
            "remaining": if unlimited { Value::Null } else { json!(f.remaining) },
            "next_free_at": f.next_free_at.map(webhook_bridge::routes::timestamp),
            "overridden": f.overridden,
        }));
    }
    out.print(
        json!({"user_id": reply.user_id, "tier": reply.tier, "features": features}),
        table,
    );
    Ok(())
}

pub async fn set_override(
    out: &Output,
    user_id: String,
    feature: String,
    limit: Option<String>,
    clear: bool,
) -> anyhow::Result<()> {
    let mut client = quota_client().await?;
    if clear {
        let reply = client
            .clear_override(quota::ClearOverrideRequest {
                user_id: user_id.clone(),
                feature: feature.clone(),
            })
            .await
            .map_err(refused)?
            .into_inner();
        let status = if reply.cleared {
            "cleared"
        } else {
            "no override was set"
        };
        out.print(
            json!({"user_id": user_id, "feature": feature, "cleared": reply.cleared}),
            vec![vec![status.into()]],
        );
        return Ok(());
    }
    let text = limit
        .ok_or_else(|| anyhow::anyhow!("give a limit (a number or \"unlimited\") or --clear"))?;
    let limit = if text.eq_ignore_ascii_case("unlimited") {
        quota::Limit {
            unlimited: true,
            units: 0,
        }
    } else {
        let units = text
            .parse::<i64>()
            .ok()
            .filter(|u| *u >= 0)
            .ok_or_else(|| anyhow::anyhow!("limit must be a number >= 0 or \"unlimited\""))?;
        quota::Limit {
            unlimited: false,
            units,
        }
    };
    let shown = limit_text(Some(&limit));
    client
        .set_override(quota::SetOverrideRequest {
            user_id: user_id.clone(),
            feature: feature.clone(),
            limit: Some(limit),
        })
        .await
        .map_err(refused)?;
    out.print(
        json!({"user_id": user_id, "feature": feature, "limit": shown}),
        vec![
            vec!["user".into(), "feature".into(), "limit".into()],
            vec![user_id, feature, shown],
        ],
    );
    Ok(())
}
