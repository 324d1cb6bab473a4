//! The ceilings suite (issue 14): what the server stack alone allows on this machine,
//! and every single-call path as a share of it, in one run:
//!
//! - **empty unary gRPC**: a load-generator-only service (`reeve.loadgen.v1.Empty/Ping`,
//!   empty messages, no I/O) served by `reeve_runtime::grpc::serve` behind the same
//!   [`reeve_runtime::auth::ScopeGuard`] as credits-svc and quota-svc, so it pays the
//!   connection guard, the span and metrics layer, the token and scope check and the
//!   gRPC framing, and nothing else;
//! - **empty REST**: routes mounted on the real bridge beside its API
//!   ([`webhook_bridge::start_with_extra_routes`]), under its layers (body limit, error
//!   envelope, request tracking, span and metrics), with the real authentication (the
//!   service token and its `deduct` scope for the POST, the user JWT for the GET) and
//!   the real JSON types (the POST decodes a `DeductBody`, parses its amount and
//!   answers a `Deducted`; the GET answers a `Balance`), but no gRPC call behind;
//! - the paths: single `Deduct`, `CheckQuota` read-only and with consume, REST
//!   `POST /api/credits/deduct`, REST `GET /api/credits/balance`, each beside its raw
//!   SQL equivalent.
//!
//! The ceilings are measured first and again last; the share is taken of their mean, and
//! both are printed so drift on a shared machine shows.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use reeve_proto::credits::v1 as pb;
use reeve_proto::quota::v1 as qpb;
use reeve_runtime::Micros;
use reeve_runtime::auth::{Scope, ServiceTokens};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use webhook_bridge::AppState;
use webhook_bridge::error::ApiError;
use webhook_bridge::routes::JsonBody;
use webhook_bridge::routes::credits::{Balance, DeductBody, Deducted};

use crate::stack::{Stack, user_tokens};
use crate::{Args, Figures, TOKEN, drive, pick, user};

const EMPTY_SERVICE: &str = "reeve.loadgen.v1.Empty";
const EMPTY_PATH: &str = "/reeve.loadgen.v1.Empty/Ping";
pub(crate) const EMPTY_REST_PATH: &str = "/loadgen/empty";

/// An empty unary gRPC service: `Ping(Empty) returns (Empty)`, answered at once.
#[derive(Debug, Clone, Copy)]
struct EmptyService;

impl tonic::server::NamedService for EmptyService {
    const NAME: &'static str = EMPTY_SERVICE;
}

struct Ping;

impl tonic::server::UnaryService<()> for Ping {
    type Response = ();
    type Future = std::future::Ready<Result<tonic::Response<()>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<()>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(())))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for EmptyService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() == EMPTY_PATH {
            Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(tonic_prost::ProstCodec::<(), ()>::default());
                Ok(grpc.unary(Ping, request).await)
            })
        } else {
            Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                response.headers_mut().insert(
                    "grpc-status",
                    http::HeaderValue::from(tonic::Code::Unimplemented as i32),
                );
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                Ok(response)
            })
        }
    }
}

/// Serves [`EmptyService`] the way credits-svc serves its API: `grpc::serve` with the
/// scope guard in front.
pub(crate) async fn serve_empty(
    shutdown: &CancellationToken,
) -> anyhow::Result<reeve_runtime::grpc::GrpcServer> {
    let guarded = ServiceTokens::new([TOKEN]).guard(EmptyService, &[("Ping", Scope::Deduct)]);
    let server = reeve_runtime::grpc::serve(
        "127.0.0.1:0".parse()?,
        EMPTY_SERVICE,
        tonic::service::Routes::new(guarded),
        reeve_proto::FILE_DESCRIPTOR_SET,
        shutdown,
    )
    .await?;
    server.set_serving().await;
    Ok(server)
}

/// One empty call through an authenticated channel.
pub(crate) async fn ping(
    grpc: &mut tonic::client::Grpc<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            reeve_runtime::auth::BearerToken,
        >,
    >,
) -> anyhow::Result<()> {
    grpc.ready().await?;
    grpc.unary(
        tonic::Request::new(()),
        http::uri::PathAndQuery::from_static(EMPTY_PATH),
        tonic_prost::ProstCodec::<(), ()>::default(),
    )
    .await?;
    Ok(())
}

/// The empty REST routes, mounted on the bridge beside its API.
pub(crate) fn rest_routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new().route(
        EMPTY_REST_PATH,
        axum::routing::post(empty_post).get(empty_get),
    )
}

/// What `POST /api/credits/deduct` does before and after its gRPC call: the service
/// token and its `deduct` scope (the check of `auth::Service`, whose route table does
/// not list this path), the body decoded and its amount parsed, a `Deducted` encoded.
async fn empty_post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<DeductBody>,
) -> Result<Json<Deducted>, ApiError> {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(reeve_runtime::auth::bearer_token)
        .ok_or_else(|| ApiError::unauthorized("missing_token", "Authorization: Bearer"))?;
    let caller = state
        .service_tokens
        .authenticate(token)
        .ok_or_else(|| ApiError::unauthorized("invalid_service_token", "needs a service token"))?;
    if !caller.scopes.contains(Scope::Deduct) {
        return Err(ApiError::Forbidden {
            code: "insufficient_scope",
            message: "needs the deduct scope".to_owned(),
        });
    }
    let amount = webhook_bridge::amount::parse_positive(&body.amount)?;
    let now_us = reeve_runtime::clock::now_us();
    let entry = pb::LedgerEntry {
        id: 1,
        user_id: body.user_id,
        kind: pb::EntryKind::Deduction.into(),
        amount_micros: -amount.0,
        balance_after_micros: 999_999_000_000,
        idempotency_key: body.idempotency_key,
        description: body.description,
        created_at: Some(prost_types::Timestamp {
            seconds: now_us / 1_000_000,
            nanos: i32::try_from(now_us % 1_000_000 * 1_000).unwrap_or(0),
        }),
        draws: vec![pb::LotDraw {
            lot_id: 1,
            amount_micros: amount.0,
        }],
    };
    Ok(Json(Deducted {
        entry: entry.into(),
        duplicate: false,
    }))
}

/// What `GET /api/credits/balance` does around its gRPC call: the user JWT verified, a
/// `Balance` encoded.
async fn empty_get(
    webhook_bridge::auth::User(user_id): webhook_bridge::auth::User,
) -> Json<Balance> {
    let micros = 999_999_000_000;
    Json(Balance {
        user_id,
        balance: Micros(micros).to_string(),
        balance_micros: micros,
        paid: Micros(micros).to_string(),
        paid_micros: micros,
        promotional: Micros(0).to_string(),
        promotional_micros: 0,
        next_expiry: None,
        held: Micros(0).to_string(),
        held_micros: 0,
        available: Micros(micros).to_string(),
        available_micros: micros,
    })
}

/// A REST call that must answer 200.
pub(crate) async fn expect_ok(request: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let response = request.send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status == reqwest::StatusCode::OK,
        "HTTP {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

pub(crate) fn deduct_body(user_id: &str, key: &str) -> String {
    format!(
        r#"{{"user_id":"{user_id}","amount":"0.001","idempotency_key":"{key}","description":"loadgen"}}"#
    )
}

pub(crate) async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let stack = Arc::new(Stack::start(url, args.quota_batch_workers, rest_routes()).await?);
    let empty = serve_empty(&shutdown).await?;
    // Raw statements on a pool set up as the services' are (no ping before each use).
    let pool = reeve_runtime::db::postgres_pool(url, 64).await?;
    crate::seed(&pool, args.users).await?;
    crate::quota::seed(&pool, args.quota_users).await?;
    eprintln!(
        "seeded {} credit users and {} quota users",
        args.users, args.quota_users
    );
    let users = args.users;
    let callers = args.single_callers;
    let duration = Duration::from_secs(args.seconds);
    let mut empty_channels = Vec::new();
    for channel in crate::connect_channels(empty.local_addr).await? {
        empty_channels.push(channel);
    }
    let empty_channels = Arc::new(empty_channels);
    let tokens = user_tokens(users.min(4_096), |i| user(i, users))?;
    let features = Arc::new(crate::quota::features());
    let quota_users = args.quota_users as u64;

    let mut results: Vec<Figures> = Vec::new();

    // 0, 1, 2: the ceilings, first.
    results.push(grpc_ceiling(&empty_channels, callers, duration, "first").await?);
    results.extend(rest_ceilings(&stack, &tokens, users, callers, duration, "first").await?);

    // 3: single Deduct.
    let s = Arc::clone(&stack);
    results.push(
        drive(
            format!("Deduct (single), gRPC, {callers} callers"),
            callers,
            duration,
            move |w, seq| {
                let client = s.credits(w);
                async move {
                    client?
                        .deduct(pb::DeductRequest {
                            user_id: user(pick(w, seq, 0), users),
                            amount_micros: 1_000,
                            idempotency_key: format!("s-{w}-{seq}"),
                            description: String::new(),
                        })
                        .await?;
                    Ok(1)
                }
            },
        )
        .await?,
    );
    // 4: raw SQL, one transaction per deduction.
    results.push(crate::raw_single_deductions(&pool, users, callers, duration).await?);

    // 5..8: CheckQuota read-only and consume, each beside its raw SQL.
    for consume in [0i64, 1] {
        let s = Arc::clone(&stack);
        let f = Arc::clone(&features);
        results.push(
            drive(
                format!(
                    "CheckQuota {}, gRPC, {callers} callers",
                    if consume == 0 {
                        "read-only"
                    } else {
                        "consume 1"
                    }
                ),
                callers,
                duration,
                move |w, seq| {
                    let client = s.quota(w);
                    let (user_id, feature) = crate::quota::target(w, seq, quota_users, &f);
                    async move {
                        client?
                            .check_quota(qpb::CheckQuotaRequest {
                                user_id,
                                feature,
                                consume,
                                idempotency_key: if consume > 0 {
                                    format!("c-{w}-{seq}")
                                } else {
                                    String::new()
                                },
                            })
                            .await?;
                        Ok(1)
                    }
                },
            )
            .await?,
        );
        results.push(
            crate::quota::raw_checks(&pool, consume, quota_users, &features, callers, duration)
                .await?,
        );
    }

    // 9: REST deduct through the bridge to credits-svc.
    let s = Arc::clone(&stack);
    results.push(
        drive(
            format!("REST POST /api/credits/deduct, {callers} callers"),
            callers,
            duration,
            move |w, seq| {
                let s = Arc::clone(&s);
                async move {
                    let body = deduct_body(&user(pick(w, seq, 0), users), &format!("r-{w}-{seq}"));
                    expect_ok(
                        s.http
                            .post(format!("{}/api/credits/deduct", s.base))
                            .bearer_auth(TOKEN)
                            .header("content-type", "application/json")
                            .body(body),
                    )
                    .await?;
                    Ok(1)
                }
            },
        )
        .await?,
    );
    // 10: REST balance.
    let s = Arc::clone(&stack);
    let t = Arc::clone(&tokens);
    results.push(
        drive(
            format!("REST GET /api/credits/balance, {callers} callers"),
            callers,
            duration,
            move |w, seq| {
                let s = Arc::clone(&s);
                let token = t[(pick(w, seq, 1) % t.len() as u64) as usize].1.clone();
                async move {
                    expect_ok(
                        s.http
                            .get(format!("{}/api/credits/balance", s.base))
                            .bearer_auth(token),
                    )
                    .await?;
                    Ok(1)
                }
            },
        )
        .await?,
    );
    // 11: raw SQL balance read.
    let p = pool.clone();
    results.push(
        drive(
            format!("raw SQL: balance read (one SELECT), {callers} callers"),
            callers,
            duration,
            move |w, seq| {
                let pool = p.clone();
                async move {
                    let _: i64 = sqlx::query_scalar(
                        "SELECT balance_micros FROM credit_accounts WHERE user_id = $1",
                    )
                    .bind(user(pick(w, seq, 1) % 4_096, users))
                    .fetch_one(&pool)
                    .await
                    .context("raw balance read")?;
                    Ok(1)
                }
            },
        )
        .await?,
    );

    // 12, 13, 14: the ceilings again, last.
    results.push(grpc_ceiling(&empty_channels, callers, duration, "last").await?);
    results.extend(rest_ceilings(&stack, &tokens, users, callers, duration, "last").await?);

    println!();
    println!("| scenario | calls/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for figures in &results {
        println!("{}", figures.row());
    }
    let rate = |i: usize| results[i].per_second();
    let grpc = (rate(0) + rate(12)) / 2.0;
    let post = (rate(1) + rate(13)) / 2.0;
    let get = (rate(2) + rate(14)) / 2.0;
    let p99 = |i: usize| results[i].latency_us.value_at_quantile(0.99) as f64 / 1_000.0;
    println!();
    println!(
        "ceilings (mean of first and last): empty gRPC {grpc:.0}/s ({:.0}, {:.0}), empty REST POST {post:.0}/s ({:.0}, {:.0}), empty REST GET {get:.0}/s ({:.0}, {:.0})",
        rate(0),
        rate(12),
        rate(1),
        rate(13),
        rate(2),
        rate(14)
    );
    println!(
        "single Deduct: {:.0}% of the empty-gRPC ceiling (target ≥ 60%), p99 {:.2} ms (target < 20 ms); {:.2}× one transaction per deduction",
        100.0 * rate(3) / grpc,
        p99(3),
        rate(3) / rate(4)
    );
    println!(
        "CheckQuota read-only: {:.0}% of the empty-gRPC ceiling (target ≥ 70%); {:.2}× the raw window SUM",
        100.0 * rate(5) / grpc,
        rate(5) / rate(6)
    );
    println!(
        "CheckQuota consume: {:.0}% of the empty-gRPC ceiling (target ≥ 50%); {:.2}× the raw insert-if-under-limit",
        100.0 * rate(7) / grpc,
        rate(7) / rate(8)
    );
    println!(
        "REST deduct: {:.0}% of the empty-REST POST ceiling (target ≥ 50%); {:.2}× one transaction per deduction; {:.0}% of gRPC Deduct",
        100.0 * rate(9) / post,
        rate(9) / rate(4),
        100.0 * rate(9) / rate(3)
    );
    println!(
        "REST balance: {:.0}% of the empty-REST GET ceiling (target ≥ 60%); {:.2}× the raw balance SELECT",
        100.0 * rate(10) / get,
        rate(10) / rate(11)
    );
    println!(
        "empty REST POST ceiling: {:.0}% of the empty-gRPC ceiling",
        100.0 * post / grpc
    );
    shutdown.cancel();
    empty.wait().await?;
    Ok(())
}

/// Empty unary calls from `callers` callers over the shared connections.
pub(crate) async fn grpc_ceiling(
    channels: &Arc<Vec<tonic::transport::Channel>>,
    callers: usize,
    duration: Duration,
    label: &str,
) -> anyhow::Result<Figures> {
    let channels = Arc::clone(channels);
    drive(
        format!("ceiling: empty unary gRPC ({label}), {callers} callers"),
        callers,
        duration,
        move |w, _| {
            let channel = channels[w % channels.len()].clone();
            async move {
                let token = reeve_runtime::auth::BearerToken::new(TOKEN)?;
                let mut grpc = tonic::client::Grpc::new(
                    tonic::service::interceptor::InterceptedService::new(channel, token),
                );
                ping(&mut grpc).await?;
                Ok(1)
            }
        },
    )
    .await
}

/// The empty REST POST (service token, a deduction's JSON) and GET (user JWT, a
/// balance's JSON) through the bridge's layers.
async fn rest_ceilings(
    stack: &Arc<Stack>,
    tokens: &Arc<Vec<(String, String)>>,
    users: usize,
    callers: usize,
    duration: Duration,
    label: &str,
) -> anyhow::Result<Vec<Figures>> {
    let mut results = Vec::new();
    let s = Arc::clone(stack);
    results.push(
        drive(
            format!("ceiling: empty REST POST, service token + JSON ({label}), {callers} callers"),
            callers,
            duration,
            move |w, seq| {
                let s = Arc::clone(&s);
                async move {
                    let body = deduct_body(&user(pick(w, seq, 0), users), &format!("e-{w}-{seq}"));
                    expect_ok(
                        s.http
                            .post(format!("{}{EMPTY_REST_PATH}", s.base))
                            .bearer_auth(TOKEN)
                            .header("content-type", "application/json")
                            .body(body),
                    )
                    .await?;
                    Ok(1)
                }
            },
        )
        .await?,
    );
    let s = Arc::clone(stack);
    let t = Arc::clone(tokens);
    results.push(
        drive(
            format!("ceiling: empty REST GET, user JWT + JSON ({label}), {callers} callers"),
            callers,
            duration,
            move |w, seq| {
                let s = Arc::clone(&s);
                let token = t[(pick(w, seq, 1) % t.len() as u64) as usize].1.clone();
                async move {
                    expect_ok(
                        s.http
                            .get(format!("{}{EMPTY_REST_PATH}", s.base))
                            .bearer_auth(token),
                    )
                    .await?;
                    Ok(1)
                }
            },
        )
        .await?,
    );
    Ok(results)
}

/// REST deductions only, for `--seconds`: what `perf` samples for the per-layer costs
/// of one REST deduction (`--suite rest-deduct`).
pub(crate) async fn run_rest_deduct(args: &Args, url: &str) -> anyhow::Result<()> {
    let stack = Arc::new(Stack::start(url, args.quota_batch_workers, rest_routes()).await?);
    let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
    crate::seed(&pool, args.users).await?;
    let users = args.users;
    let callers = args.single_callers;
    eprintln!(
        "seeded; REST deductions for {} s (pid {})",
        args.seconds,
        std::process::id()
    );
    let s = Arc::clone(&stack);
    let figures = drive(
        format!("REST POST /api/credits/deduct, {callers} callers"),
        callers,
        Duration::from_secs(args.seconds),
        move |w, seq| {
            let s = Arc::clone(&s);
            async move {
                let body = deduct_body(&user(pick(w, seq, 0), users), &format!("r-{w}-{seq}"));
                expect_ok(
                    s.http
                        .post(format!("{}/api/credits/deduct", s.base))
                        .bearer_auth(TOKEN)
                        .header("content-type", "application/json")
                        .body(body),
                )
                .await?;
                Ok(1)
            }
        },
    )
    .await?;
    println!("{}", figures.row());
    Ok(())
}
