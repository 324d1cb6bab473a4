//! Connection limits of every Reeve server, on real sockets: the cap, the header
//! deadline, the idle deadline, and that a request being served is never cut by the
//! header deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reeve_runtime::connections::{GuardedListener, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server that reads each connection until its deadline closes it. A connection
/// whose first bytes are `REQ` counts as a request served for `hold`.
async fn serve(limits: Limits, hold: Duration) -> SocketAddr {
    let mut listener = GuardedListener::new(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        limits,
        "test",
    );
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = std::future::poll_fn(|cx| listener.poll_accept(cx)).await;
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if buf[..n].starts_with(b"REQ") {
                        let guard = stream.conn_info().tracker.request_started();
                        tokio::time::sleep(hold).await;
                        drop(guard);
                        let _ = stream.write_all(b"DONE").await;
                    }
                }
            });
        }
    });
    addr
}

/// Whether the server closed `stream` within `within` (EOF or reset).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 16];
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
    };
    assert_eq!(limits.effective_max_connections(), 2);
    let addr = serve(limits, Duration::ZERO).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut third, Duration::from_secs(2)).await);
    assert!(!closed_within(&mut first, Duration::from_millis(300)).await);
    assert!(!closed_within(&mut second, Duration::from_millis(10)).await);
    // Closing one frees its place.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    assert!(!closed_within(&mut fourth, Duration::from_millis(300)).await);
}

#[tokio::test]
async fn unfinished_heads_are_closed_at_the_header_deadline() {
    let limits = Limits {
        max_connections: 100,
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(30),
    };
    let addr = serve(limits, Duration::ZERO).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut h2_preface = TcpStream::connect(addr).await.unwrap();
    h2_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for stream in [&mut silent, &mut partial, &mut h2_preface] {
        assert!(closed_within(stream, Duration::from_secs(3)).await);
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn a_request_being_served_outlives_the_header_deadline_then_idles_out() {
    let limits = Limits {
        max_connections: 100,
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(800),
    };
    let addr = serve(limits, Duration::from_millis(600)).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"REQ").await.unwrap();
    let mut buf = [0u8; 4];
    // Served for 600 ms, three header deadlines long: the answer still comes.
    tokio::time::timeout(Duration::from_secs(3), client.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"DONE");
    // Then the connection is idle: kept a while, closed after the idle timeout.
    let idle_from = Instant::now();
    assert!(!closed_within(&mut client, Duration::from_millis(400)).await);
    assert!(closed_within(&mut client, Duration::from_secs(3)).await);
    assert!(idle_from.elapsed() >= Duration::from_millis(700));
}
