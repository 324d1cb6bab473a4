//! Traces: `reeve up` exports spans over OTLP to a collector of our own on loopback
//! (the OTLP gRPC trace service, from opentelemetry-proto). A purchase is one trace from
//! the REST request through the gRPC call into credits-svc (W3C trace context carried
//! in gRPC metadata), and no span carries a token or a secret.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Value, json};

const REEVE: &str = env!("CARGO_BIN_EXE_reeve");

#[derive(Clone, Default)]
struct Collector {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_is_one_trace_across_services_and_spans_hold_no_secrets() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(REEVE)
        .arg("up")
        .current_dir(dir.path())
        .env_clear()
        .env("REEVE_HTTP_ADDR", "127.0.0.1:0")
        .env("REEVE_CREDITS_ADDR", "127.0.0.1:0")
        .env("REEVE_QUOTA_ADDR", "127.0.0.1:0")
        .env("REEVE_FAKE_STRIPE_ADDR", "127.0.0.1:0")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("listening "))
            .unwrap()
    })
    .await
    .unwrap();
    let http_addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("http="))
        .unwrap()
        .to_owned();
    let base = format!("http://{http_addr}");
    let secrets: toml::Table = toml::from_str(
        &std::fs::read_to_string(dir.path().join("reeve-data/dev-secrets.toml")).unwrap(),
    )
    .unwrap();
    let token = String::from_utf8(
        Command::new(REEVE)
            .args(["dev-token", "alice"])
            .current_dir(dir.path())
            .env_clear()
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();

    let http = reqwest::Client::new();
    let purchase: Value = http
        .post(format!("{base}/api/credits/purchase"))
        .bearer_auth(&token)
        .json(&json!({"amount": 10}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paid = http
        .post(format!(
            "{}/pay",
            purchase["checkout_url"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert!(paid.status().is_success());

    // SIGTERM flushes the batch exporter before exit.
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "reeve up did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let requests = collector.requests.lock().unwrap().clone();
    let spans: Vec<Span> = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| s.spans.clone())
        .collect();
    assert!(!spans.is_empty(), "no span was exported");
    let purchase_http = spans
        .iter()
        .find(|s| s.name == "http" && attribute(s, "http.route") == Some("/api/credits/purchase"))
        .expect("the REST purchase span");
    let purchase_rpc = spans
        .iter()
        .find(|s| {
            s.name == "rpc"
                && attribute(s, "rpc.method") == Some("/reeve.credits.v1.CreditService/Purchase")
        })
        .expect("the credits-svc Purchase span");
    assert_eq!(
        purchase_rpc.trace_id, purchase_http.trace_id,
        "the gRPC server span belongs to the REST request's trace"
    );
    assert_ne!(
        purchase_rpc.parent_span_id,
        Vec::<u8>::new(),
        "the server span has a remote parent"
    );
    assert_eq!(attribute(purchase_http, "user_id"), Some("alice"));
    let credited = spans
        .iter()
        .find(|s| {
            s.name == "rpc"
                && attribute(s, "rpc.method")
                    == Some("/reeve.credits.v1.CreditService/RecordPaymentEvent")
        })
        .expect("the webhook's RecordPaymentEvent span");
    let webhook = spans.iter().find(|s| {
        s.name == "http"
            && attribute(s, "http.route") == Some("/api/credits/webhook")
            && s.trace_id == credited.trace_id
    });
    assert!(
        webhook.is_some(),
        "the webhook's credit is one trace from the bridge into credits-svc"
    );

    let everything = format!("{requests:?}");
    for (name, secret) in [
        ("user JWT", token.as_str()),
        (
            "service token",
            secrets["REEVE_SERVICE_TOKEN"].as_str().unwrap(),
        ),
        (
            "JWT secret",
            secrets["REEVE_JWT_HS256_SECRET"].as_str().unwrap(),
        ),
        (
            "webhook secret",
            secrets["STRIPE_WEBHOOK_SECRET"].as_str().unwrap(),
        ),
        ("Stripe key", "sk_test_reeve_fake_stripe"),
    ] {
        assert!(
            !everything.contains(secret),
            "the {name} appears in an exported span"
        );
    }
}
