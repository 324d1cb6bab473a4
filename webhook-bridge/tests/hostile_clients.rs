//! Clients that open connections and never finish their headers cannot make the bridge
//! or a gRPC service unavailable: 1,000 such connections against each, in a process
//! started with the 512-descriptor limit of the issue, and `/healthz`, REST and gRPC
//! still answer; the server then closes them at its header deadline.
//!
//! Its own test binary: it changes the process's descriptor limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Backend, Stack};
use reeve_proto::credits::v1 as credits_pb;
use reeve_runtime::connections::Limits;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IDLE_CONNECTIONS: usize = 1_000;

/// Opens `count` connections to `addr`; every other one sends a head it never finishes.
async fn hold_half_open(
    addr: std::net::SocketAddr,
    count: usize,
    partial: &[u8],
) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
        if i % 2 == 0 {
            stream.write_all(partial).await.unwrap();
        }
        held.push(stream);
    }
    held
}

/// How many of `streams` the server has closed (EOF or reset) within `within`.
async fn closed_by_server(streams: Vec<TcpStream>, within: Duration) -> usize {
    let reads = streams.into_iter().map(|mut stream| async move {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(within, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_open_connections_leave_health_rest_and_grpc_answering() {
    // The machine of the issue: 512 descriptors (soft), a higher hard limit.
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, 512.min(hard), hard).unwrap();

    let stack = Stack::start(Backend::Sqlite).await;
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    assert_eq!(
        soft, hard,
        "the servers raise the soft limit to the hard one"
    );

    let bridge = hold_half_open(
        stack.bridge.local_addr,
        IDLE_CONNECTIONS,
        b"GET /healthz HTTP/1.1\r\nHost: reeve\r\n",
    )
    .await;
    let grpc = hold_half_open(stack.credits_addr, IDLE_CONNECTIONS, b"PRI * HTTP/2.0\r\n").await;

    // Everything still answers while they are held.
    let (status, body) = stack
        .request(reqwest::Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stack.grant("alice", 3).await;
    assert_eq!(stack.balance("alice").await, 3_000_000);
    let reply = stack
        .credits_client()
        .await
        .get_balance(credits_pb::GetBalanceRequest {
            user_id: "alice".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.balance_micros, 3_000_000);

    // And the server lets go of them at its header deadline.
    let within =
        Limits::HTTP.header_timeout.max(Limits::GRPC.header_timeout) + Duration::from_secs(5);
    let (bridge_closed, grpc_closed) = tokio::join!(
        closed_by_server(bridge, within),
        closed_by_server(grpc, within)
    );
    assert_eq!(bridge_closed, IDLE_CONNECTIONS, "bridge connections closed");
    assert_eq!(grpc_closed, IDLE_CONNECTIONS, "gRPC connections closed");

    // Still answering afterwards.
    let (status, _) = stack
        .request(reqwest::Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
}
