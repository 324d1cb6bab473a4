//! Scoped service tokens as an operator meets them: `reeve token new` makes a file
//! entry, a bad `REEVE_SERVICE_TOKENS_FILE` stops the process with exit code 2 naming
//! the variable (and never echoes the file), and a running `reeve up` refuses a
//! deduct-only token the admin calls while plain `REEVE_SERVICE_TOKENS` still does
//! everything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use reeve_runtime::auth::{BearerToken, Scope, ServiceTokens, token_digest_hex};

const REEVE: &str = env!("CARGO_BIN_EXE_reeve");

fn reeve(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(REEVE)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .env("REEVE_HTTP_ADDR", "127.0.0.1:0")
        .env("REEVE_CREDITS_ADDR", "127.0.0.1:0")
        .env("REEVE_QUOTA_ADDR", "127.0.0.1:0")
        .env("REEVE_FAKE_STRIPE_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn token_new_prints_the_token_once_and_an_entry_with_only_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let output = reeve(
        dir.path(),
        &["token", "new", "gateway", "--scopes", "deduct,quota"],
        &[],
    );
    assert!(output.status.success(), "{output:?}");
    let entry = String::from_utf8(output.stdout).unwrap();
    let token = String::from_utf8(output.stderr)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    assert!(token.starts_with("svc_"));
    assert!(!entry.contains(&token), "the entry holds the token itself");
    assert!(entry.contains(&token_digest_hex(&token)));
    let tokens = ServiceTokens::parse_file(&entry).unwrap();
    let caller = tokens.authenticate(&token).unwrap();
    assert_eq!(&*caller.name, "gateway");
    assert_eq!(
        caller.scopes,
        [Scope::Deduct, Scope::Quota].into_iter().collect()
    );

    let output = reeve(
        dir.path(),
        &["token", "new", "gw", "--scopes", "everything"],
        &[],
    );
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

#[test]
fn a_bad_token_file_stops_the_process_naming_the_variable_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let digest = token_digest_hex("some-token");
    let cases = [
        // The token pasted where its digest belongs.
        "[[token]]\nname = \"gateway\"\nsha256 = \"svc_SECRET_pasted_token\"\nscopes = [\"deduct\"]\n".to_owned(),
        format!("[[token]]\nname = \"gateway\"\nsha256 = \"{digest}\"\nscopes = [\"deduct\", \"SECRETscope\"]\n"),
        "[[token]]\nname = \"gateway\"\nsha256 = svc_SECRET_unquoted\n".to_owned(),
    ];
    for text in cases {
        std::fs::write(&file, &text).unwrap();
        let output = reeve(
            dir.path(),
            &["up"],
            &[("REEVE_SERVICE_TOKENS_FILE", file.to_str().unwrap())],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(2), "{text}\n{stderr}");
        assert!(stderr.contains("REEVE_SERVICE_TOKENS_FILE"), "{stderr}");
        assert!(
            !stderr.contains("SECRET") && !stdout.contains("SECRET"),
            "{stderr}{stdout}"
        );
    }
    let output = reeve(
        dir.path(),
        &["up"],
        &[("REEVE_SERVICE_TOKENS_FILE", "/nonexistent/tokens.toml")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("REEVE_SERVICE_TOKENS_FILE"));
}

/// A `reeve up` whose tokens are a file (gateway: deduct) plus a plain token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reeve_up_enforces_the_scopes_of_its_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    std::fs::write(
        &file,
        format!(
            "[[token]]\nname = \"gateway\"\nsha256 = \"{}\"\nscopes = [\"deduct\"]\n",
            token_digest_hex("gateway-secret")
        ),
    )
    .unwrap();
    let mut child = Command::new(REEVE)
        .arg("up")
        .current_dir(dir.path())
        .env_clear()
        .env("REEVE_HTTP_ADDR", "127.0.0.1:0")
        .env("REEVE_CREDITS_ADDR", "127.0.0.1:0")
        .env("REEVE_QUOTA_ADDR", "127.0.0.1:0")
        .env("REEVE_FAKE_STRIPE_ADDR", "127.0.0.1:0")
        .env("REEVE_SERVICE_TOKENS", "plain-every-scope")
        .env("REEVE_SERVICE_TOKENS_FILE", &file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("listening ") {
                let _ = tx.send(line);
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    let Ok(ready) = ready else {
        let _ = child.kill();
        panic!("reeve up did not start");
    };
    let credits = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("credits="))
        .unwrap()
        .to_owned();
    let client = |token: &str| {
        let channel = tonic::transport::Channel::from_shared(format!("http://{credits}"))
            .unwrap()
            .connect_lazy();
        CreditServiceClient::with_interceptor(channel, BearerToken::new(token).unwrap())
    };
    let grant = || pb::AddCreditsRequest {
        user_id: "alice".to_owned(),
        amount_micros: 5_000_000,
        idempotency_key: "file-grant".to_owned(),
        kind: pb::CreditKind::Grant.into(),
        description: String::new(),
        ..Default::default()
    };
    let refused = client("gateway-secret").add_credits(grant()).await;
    let granted = client("plain-every-scope").add_credits(grant()).await;
    let deducted = client("gateway-secret")
        .deduct(pb::DeductRequest {
            user_id: "alice".to_owned(),
            amount_micros: 1_000,
            idempotency_key: "file-deduct".to_owned(),
            description: String::new(),
        })
        .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        refused.unwrap_err().code(),
        tonic::Code::PermissionDenied,
        "a deduct-only token granted credits"
    );
    granted.unwrap();
    deducted.unwrap();
}
