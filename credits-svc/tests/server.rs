//! Transport-level behaviour: service-token auth, health and reflection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, TestDb, channel, client, client_with_token};
use reeve_proto::credits::v1 as pb;
use reeve_proto::credits::v1::credit_service_client::CreditServiceClient;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn requests_without_a_valid_service_token_are_unauthenticated() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = db.start().await;
    let request = || pb::GetBalanceRequest {
        user_id: "a".into(),
    };

    let mut anonymous = CreditServiceClient::new(channel(server.local_addr).await);
    assert_eq!(
        anonymous.get_balance(request()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut wrong = client_with_token(server.local_addr, "test-service-tokeN").await;
    let status = wrong.get_balance(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!status.message().contains("tokeN"));
    let mut raw = tonic::Request::new(request());
    raw.metadata_mut()
        .insert("authorization", "test-service-token".parse().unwrap());
    assert_eq!(
        anonymous.get_balance(raw).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Both configured tokens are accepted.
    client(server.local_addr)
        .await
        .get_balance(request())
        .await
        .unwrap();
    client_with_token(server.local_addr, "second-token")
        .await
        .get_balance(request())
        .await
        .unwrap();
}

#[tokio::test]
async fn health_is_serving_and_turns_not_serving_on_shutdown() {
    let db = TestDb::new(Backend::Postgres).await;
    let server = db.start().await;
    let mut health = HealthClient::new(channel(server.local_addr).await);
    for service in ["", credits_svc::SERVICE_NAME] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    server.stop().await.unwrap();
    assert!(
        health
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_err()
    );
}

#[tokio::test]
async fn reflection_lists_the_credit_service() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = db.start().await;
    let mut reflection = ServerReflectionClient::new(channel(server.local_addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&credits_svc::SERVICE_NAME.to_owned()),
        "{names:?}"
    );
}

#[tokio::test]
async fn refuses_to_start_on_an_unsupported_database_url() {
    let mut config = TestDb::new(Backend::Sqlite).await.config();
    config.database_url = "mysql://localhost/x".into();
    assert!(
        credits_svc::start(config, tokio_util::sync::CancellationToken::new())
            .await
            .is_err()
    );
}
