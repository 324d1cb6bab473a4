//! The whole of Reeve started in this process, as production runs it, for the suites
//! that cross services (ceilings, soak): credits-svc, quota-svc and webhook-bridge on
//! port 0 against one schema, plus the clients a gateway and a frontend would use
//! (gRPC channels, a pooled HTTP client, user JWTs, Stripe-signed webhooks).
//!
//! The bridge is started with the load generator's own routes beside the API
//! ([`webhook_bridge::start_with_extra_routes`]): the empty-REST ceiling pays the same
//! layers a real route pays. Nothing here is reachable from a production binary.

use std::sync::Arc;
use std::time::Duration;

use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_proto::quota::v1::quota_service_client::QuotaServiceClient;
use reeve_runtime::auth::{BearerToken, ServiceTokens};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::TOKEN;

pub(crate) const JWT_SECRET: &str = "loadgen-jwt-secret-not-a-real-one";
pub(crate) const WEBHOOK_SECRET: &str = "whsec_loadgen_not_a_real_one";

pub(crate) type CreditsClient = CreditServiceClient<InterceptedService<Channel, BearerToken>>;
pub(crate) type QuotaClient = QuotaServiceClient<InterceptedService<Channel, BearerToken>>;

/// The started services and their clients; everything stops when it is dropped.
pub(crate) struct Stack {
    /// `http://127.0.0.1:<port>` of the bridge.
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    credits_channels: Vec<Channel>,
    quota_channels: Vec<Channel>,
    shutdown: CancellationToken,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Stack {
    /// Starts the three services on `url` (a schema's URL) with `extra` routes on the
    /// bridge.
    pub(crate) async fn start(
        url: &str,
        quota_batch_workers: usize,
        extra: axum::Router<Arc<webhook_bridge::AppState>>,
    ) -> anyhow::Result<Stack> {
        let shutdown = CancellationToken::new();
        let credits = credits_svc::start(
            credits_svc::Config {
                database_url: url.to_owned(),
                listen_addr: "127.0.0.1:0".parse()?,
                service_tokens: ServiceTokens::new([TOKEN]),
                deduct_workers: None,
                lot_sweep_interval: Duration::from_secs(60),
                clock: reeve_runtime::clock::Clock::system(),
                checkout: None,
            },
            shutdown.clone(),
        )
        .await?;
        let quota = quota_svc::start(
            quota_svc::Config {
                database_url: url.to_owned(),
                listen_addr: "127.0.0.1:0".parse()?,
                service_tokens: ServiceTokens::new([TOKEN]),
                registry_path: None,
                batch_workers: quota_batch_workers,
            },
            shutdown.clone(),
        )
        .await?;
        let bridge = webhook_bridge::start_with_extra_routes(
            webhook_bridge::Config {
                http_addr: "127.0.0.1:0".parse()?,
                credits_url: format!("http://{}", credits.local_addr),
                quota_url: format!("http://{}", quota.local_addr),
                service_tokens: ServiceTokens::new([TOKEN]),
                service_token: TOKEN.into(),
                jwt: webhook_bridge::auth::JwtKey::Hs256(JWT_SECRET.into()),
                jwt_audience: None,
                jwt_issuer: None,
                webhook_secret: WEBHOOK_SECRET.into(),
                database_url: url.to_owned(),
                currency: "usd".to_owned(),
            },
            extra,
            shutdown.clone(),
        )
        .await?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Stack {
            base: format!("http://{}", bridge.local_addr),
            http,
            credits_channels: crate::connect_channels(credits.local_addr).await?,
            quota_channels: crate::connect_channels(quota.local_addr).await?,
            shutdown,
        })
    }

    /// A credits-svc client on one of the shared HTTP/2 connections.
    pub(crate) fn credits(&self, worker: usize) -> anyhow::Result<CreditsClient> {
        Ok(CreditServiceClient::with_interceptor(
            self.credits_channels[worker % self.credits_channels.len()].clone(),
            BearerToken::new(TOKEN)?,
        ))
    }

    pub(crate) fn quota(&self, worker: usize) -> anyhow::Result<QuotaClient> {
        Ok(QuotaServiceClient::with_interceptor(
            self.quota_channels[worker % self.quota_channels.len()].clone(),
            BearerToken::new(TOKEN)?,
        ))
    }
}

/// A user JWT (HS256, an hour) as a frontend would hold it.
pub(crate) fn user_token(user_id: &str) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: i64,
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            sub: user_id,
            exp: reeve_runtime::clock::now_us() / 1_000_000 + 3_600,
        },
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}

/// Tokens for the first `count` users of `user`'s population, minted once (a frontend
/// reuses its token; minting is not what is measured).
pub(crate) fn user_tokens(
    count: usize,
    user: impl Fn(u64) -> String,
) -> anyhow::Result<Arc<Vec<(String, String)>>> {
    let tokens = (0..count as u64)
        .map(|i| {
            let user_id = user(i);
            let token = user_token(&user_id)?;
            anyhow::Ok((user_id, token))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Arc::new(tokens))
}
