//! What the outbox costs DeductBatch (issue 12: at most 10%), run after the other
//! credits scenarios on the same server and database, back to back so the two figures
//! share the machine's mood:
//!
//! - **quiet**: DeductBatch ×100 on users with no low-balance alert and no endpoint
//!   registered (the outbox lookup finds nothing, no event is written);
//! - **busy**: the same after every user gets an alert just below their balance (their
//!   first deduction of the scenario crosses it: one `credits.balance_low` row in the
//!   outbox, written in the deduction's transaction) and an endpoint is registered on a
//!   receiver of our own on loopback, so the dispatcher delivers while the batches run.
//!
//! Every deduction must be applied; the events written and the deliveries received are
//! printed with the ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::BearerToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{Args, Figures, drive, pick, user};

type Client = CreditServiceClient<InterceptedService<Channel, BearerToken>>;

const BATCH_ITEMS: u64 = 100;

/// Both scenarios; the busy one's figures come second.
pub(crate) async fn run(
    args: &Args,
    client: Arc<impl Fn(usize) -> Client + Send + Sync + 'static>,
    pool: &sqlx::PgPool,
    url: &str,
) -> anyhow::Result<Vec<Figures>> {
    let duration = Duration::from_secs(args.seconds);
    let mut results = Vec::new();
    results.push(
        drive(
            format!(
                "DeductBatch ×100, gRPC, {} clients, no alert, no endpoint",
                args.batch_clients
            ),
            args.batch_clients,
            duration,
            deduct_batches(Arc::clone(&client), args.users, "ob-quiet"),
        )
        .await?,
    );

    // Every user's alert 500 micros below their balance: each deduction here takes at
    // least 1,000, so a user's first one crosses it.
    sqlx::query(
        "INSERT INTO credit_balance_alerts (user_id, threshold_micros, armed, updated_at_us) \
         SELECT user_id, balance_micros - 500, true, 0 FROM credit_accounts \
         WHERE balance_micros > 500 \
         ON CONFLICT (user_id) DO UPDATE SET threshold_micros = excluded.threshold_micros, armed = true",
    )
    .execute(pool)
    .await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver_addr = listener.local_addr()?;
    let serving = tokio::spawn(async move { axum::serve(listener, receiver).await });
    let events = reeve_events::EventStore::open(url).await?;
    let endpoint = events
        .add_endpoint(
            &format!("http://{receiver_addr}/hook"),
            &[],
            reeve_runtime::clock::now_us(),
        )
        .await?;
    let outbox_before: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
        .fetch_one(pool)
        .await?;
    results.push(
        drive(
            format!(
                "DeductBatch ×100, gRPC, {} clients, an endpoint + every user's first deduction crossing its alert",
                args.batch_clients
            ),
            args.batch_clients,
            duration,
            deduct_batches(Arc::clone(&client), args.users, "ob-busy"),
        )
        .await?,
    );
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
        .fetch_one(pool)
        .await?;
    events.remove_endpoint(&endpoint.id).await?;
    serving.abort();
    let ratio = results[1].per_second() / results[0].per_second();
    eprintln!(
        "outbox: {} events written during the busy scenario, {} delivered to the receiver meanwhile",
        written - outbox_before,
        received.load(Ordering::Relaxed)
    );
    eprintln!(
        "DeductBatch ×100 with the outbox busy vs quiet: {:.0}% (target ≥ 90%)",
        ratio * 100.0
    );
    Ok(results)
}

/// DeductBatch ×100 calls of `prefix`-keyed deductions over `users` users.
fn deduct_batches(
    client: Arc<impl Fn(usize) -> Client + Send + Sync + 'static>,
    users: usize,
    prefix: &'static str,
) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<u64>> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |w, s| {
        let mut client = client(w);
        Box::pin(async move {
            let items = (0..BATCH_ITEMS)
                .map(|i| pb::DeductRequest {
                    user_id: user(pick(w, s, i), users),
                    amount_micros: 1_000 + (i as i64 % 500),
                    idempotency_key: format!("{prefix}-{w}-{s}-{i}"),
                    description: String::new(),
                })
                .collect();
            crate::deduct_all(&mut client, items).await
        })
    }
}
