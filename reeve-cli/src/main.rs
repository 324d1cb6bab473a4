//! `reeve`: run the whole system in one process (`reeve up`), apply migrations
//! (`reeve migrate`), or administer a running system over gRPC (balance, grant, lots,
//! adjust, history, set-tier, usage, override, dev-token).
//!
//! Configuration comes from the `REEVE_*` variables (environment, then the TOML file
//! named by `REEVE_CONFIG_FILE`, then the dev values `reeve up` generated into
//! `<data dir>/dev-secrets.toml`), so the admin commands find a local `reeve up`
//! without flags.

/// mimalloc instead of glibc's malloc: the allocator was the largest single cost of a
/// REST deduction (28% of the process's CPU, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod dev;
mod events;
mod reconcile;
mod token;
mod up;
mod webhooks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use reeve_runtime::config::ConfigError;

#[derive(Debug, Parser)]
#[command(name = "reeve", version, about = "Reeve credits & quotas")]
struct Cli {
    /// Where `reeve up` keeps its SQLite file and generated dev secrets.
    #[arg(
        long,
        global = true,
        default_value = "reeve-data",
        env = "REEVE_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// Print JSON instead of tables (admin commands).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run credits-svc, quota-svc and webhook-bridge in one process on the embedded
    /// default (SQLite under the data dir; a fake Stripe when STRIPE_SECRET_KEY is unset).
    Up,
    /// Apply every service's database migrations to REEVE_DATABASE_URL and exit.
    Migrate,
    /// A user's balance.
    Balance { user_id: String },
    /// Grant credits (decimal, e.g. 25 or 0.5) to a user.
    Grant {
        user_id: String,
        amount: String,
        /// Idempotency key; a retry with the same key grants once. Default: a new key.
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value = "admin grant")]
        reason: String,
        /// A paid lot (refund liability); default: promotional.
        #[arg(long)]
        paid: bool,
        /// 0 to 100, lower spent first; default 10 (promotional) or 50 (paid).
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..=100))]
        priority: Option<i32>,
        /// When the lot's remainder expires, RFC 3339 (e.g. 2030-01-01T00:00:00Z); in
        /// the future. Default: never.
        #[arg(long, value_name = "RFC3339")]
        expires: Option<String>,
    },
    /// A user's credit lots in spending order (the live ones; all with --all).
    Lots {
        user_id: String,
        /// Also the lots spent, expired or revoked.
        #[arg(long)]
        all: bool,
    },
    /// Credit (+) or debit (−) a user with a reason; a debit may leave a debt.
    Adjust {
        user_id: String,
        /// Signed decimal credits, e.g. -5 or 2.5.
        #[arg(allow_hyphen_values = true)]
        amount: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        key: Option<String>,
    },
    /// A user's ledger entries, newest first.
    History {
        user_id: String,
        #[arg(long, default_value_t = 20)]
        limit: i32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Set a user's tier (free, pro, enterprise).
    SetTier { user_id: String, tier: String },
    /// A user's quota usage, every feature.
    Usage { user_id: String },
    /// Set (a number or "unlimited") or clear a user's limit for one feature.
    Override {
        user_id: String,
        feature: String,
        /// A number of units, or "unlimited"; omit with --clear.
        limit: Option<String>,
        #[arg(long, conflicts_with = "limit")]
        clear: bool,
    },
    /// Compare Stripe's payments, refunds and disputes of a period with the ledger;
    /// exit 0 when all match, 1 when differences remain, 2 on an error.
    Reconcile {
        /// Start of the period (Stripe's `created`), RFC 3339; default: 30 days before --until.
        #[arg(long, value_name = "RFC3339")]
        since: Option<String>,
        /// End of the period, RFC 3339; default: now.
        #[arg(long, value_name = "RFC3339")]
        until: Option<String>,
        /// Apply what is certain (missing credits, refund and dispute debits,
        /// reinstatements) through the webhook path's keys.
        #[arg(long)]
        repair: bool,
    },
    /// Stored Stripe events: those needing a person, one in full, a replay.
    Events {
        #[command(subcommand)]
        command: events::EventsCommand,
    },
    /// Outbound webhook endpoints: add (prints the new secret once), list, remove.
    Endpoints {
        #[command(subcommand)]
        command: webhooks::EndpointsCommand,
    },
    /// The webhook attempt log, newest first (`retry ID` sends a delivery again).
    Deliveries {
        #[command(subcommand)]
        command: Option<webhooks::DeliveriesCommand>,
        /// Only this endpoint's deliveries.
        #[arg(long)]
        endpoint: Option<String>,
        /// Only failed attempts.
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Service tokens for REEVE_SERVICE_TOKENS_FILE.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Mint a user JWT with the dev HS256 secret (REEVE_JWT_HS256_SECRET).
    DevToken {
        user_id: String,
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: i64,
        /// Print a link that opens the billing page signed in (REEVE_HTTP_ADDR).
        #[arg(long)]
        link: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// A new token: printed once on stderr; its `[[token]]` entry (name, SHA-256,
    /// scopes) on stdout, ready to append to the tokens file.
    New {
        /// The token's name in logs and errors (letters, digits, '-', '_', '.').
        name: String,
        /// Comma-separated: deduct, quota, admin, stripe.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up => up::run(&cli.data_dir).await,
        Command::Token {
            command: TokenCommand::New { name, scopes },
        } => token::new(&name, &scopes),
        Command::Reconcile {
            since,
            until,
            repair,
        } => {
            if let Err(error) = dev::install_layers(&cli.data_dir, false) {
                return config_error(&error);
            }
            return reconcile::main(since, until, repair, cli.json).await;
        }
        command => {
            if let Err(error) = dev::install_layers(&cli.data_dir, false) {
                return config_error(&error);
            }
            run(command, cli.json).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => match error.downcast_ref::<ConfigError>() {
            Some(config) => config_error(config),
            None => {
                eprintln!("reeve: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn config_error(error: &ConfigError) -> ExitCode {
    eprintln!("reeve: configuration error: {error}");
    ExitCode::from(2)
}

async fn run(command: Command, json: bool) -> anyhow::Result<()> {
    let out = admin::Output { json };
    match command {
        Command::Up | Command::Token { .. } | Command::Reconcile { .. } => {
            unreachable!("handled in main")
        }
        Command::Events { command } => events::run(command, json).await,
        Command::Endpoints { command } => webhooks::endpoints(command, json).await,
        Command::Deliveries {
            command,
            endpoint,
            failed,
            limit,
        } => webhooks::deliveries(command, endpoint, failed, limit, json).await,
        Command::Migrate => up::migrate().await,
        Command::Balance { user_id } => admin::balance(&out, user_id).await,
        Command::Grant {
            user_id,
            amount,
            key,
            reason,
            paid,
            priority,
            expires,
        } => {
            let terms = admin::GrantTerms {
                paid,
                priority,
                expires,
            };
            admin::grant(&out, user_id, &amount, key, reason, terms).await
        }
        Command::Lots { user_id, all } => admin::lots(&out, user_id, all).await,
        Command::Adjust {
            user_id,
            amount,
            reason,
            key,
        } => admin::adjust(&out, user_id, &amount, key, reason).await,
        Command::History {
            user_id,
            limit,
            cursor,
        } => admin::history(&out, user_id, limit, cursor).await,
        Command::SetTier { user_id, tier } => admin::set_tier(&out, user_id, tier).await,
        Command::Usage { user_id } => admin::usage(&out, user_id).await,
        Command::Override {
            user_id,
            feature,
            limit,
            clear,
        } => admin::set_override(&out, user_id, feature, limit, clear).await,
        Command::DevToken {
            user_id,
            ttl_secs,
            link,
        } => dev::print_token(&user_id, ttl_secs, link),
    }
}
