//! A TCP proxy to put between a service and its database, and cut: every live
//! connection is dropped at once and new ones are refused (closed as soon as they are
//! accepted) or blackholed (held open, never answered) until [`FaultProxy::restore`].
//! Fault tests see what callers see when the network to PostgreSQL fails, with
//! nothing of ours mocked.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards bytes both ways.
    Open,
    /// Live connections are dropped; new ones are closed as soon as accepted.
    Refuse,
    /// Live connections are dropped; new ones are accepted and never answered.
    Blackhole,
}

/// A running proxy; it stops (dropping every connection) when dropped.
pub struct FaultProxy {
    local_addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a loopback port of its own and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_addr = listener.local_addr().unwrap();
        let (mode, modes) = watch::channel(Mode::Open);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, upstream, modes.clone()));
            }
        });
        FaultProxy {
            local_addr,
            mode,
            accept,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Drops every live connection and refuses new ones.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Refuse);
    }

    /// Drops every live connection and blackholes new ones.
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Forwards again (connections held by a blackhole are dropped, not forwarded).
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Connection tasks see the sender gone and drop their sockets.
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, mut modes: watch::Receiver<Mode>) {
    let mode = *modes.borrow_and_update();
    match mode {
        Mode::Refuse => {}
        Mode::Blackhole => {
            // Hold the socket, unanswered, until the mode changes or the proxy goes.
            let _ = modes.changed().await;
        }
        Mode::Open => {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            let _ = client.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = async {
                    loop {
                        if modes.changed().await.is_err() || *modes.borrow() != Mode::Open {
                            break;
                        }
                    }
                } => {}
            }
        }
    }
}

/// `url` (a `postgres://` URL) with its `host:port` replaced by `addr`.
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host_start = authority.rfind('@').map_or(0, |at| at + 1);
    format!("{scheme}://{}{addr}{path}", &authority[..host_start])
}

/// The `host:port` of a `postgres://` URL, resolved.
pub async fn upstream_of(url: &str) -> SocketAddr {
    let (_, rest) = url.split_once("://").unwrap();
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host_port = &authority[authority.rfind('@').map_or(0, |at| at + 1)..];
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    tokio::net::lookup_host(host_port)
        .await
        .unwrap()
        .next()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn urls_are_rewritten_to_the_proxy() {
        let addr: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        assert_eq!(
            url_via(
                "postgres://postgres@127.0.0.1:5432/test?options[search_path]=s",
                addr
            ),
            "postgres://postgres@127.0.0.1:6000/test?options[search_path]=s"
        );
        assert_eq!(
            url_via("postgres://db/test", addr),
            "postgres://127.0.0.1:6000/test"
        );
    }

    #[tokio::test]
    async fn cut_drops_live_connections_and_refuses_new_ones_until_restored() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = FaultProxy::start(upstream).await;
        let mut live = TcpStream::connect(proxy.local_addr()).await.unwrap();
        live.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        live.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        proxy.cut();
        // The live connection ends (EOF or reset), and a new one gets nothing.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            live.read_to_end(&mut rest),
        )
        .await
        .unwrap();
        assert!(ended.is_err() || rest.is_empty());
        let mut refused = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let _ = refused.write_all(b"ping").await;
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), refused.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));

        proxy.restore();
        let mut again = TcpStream::connect(proxy.local_addr()).await.unwrap();
        again.write_all(b"pong").await.unwrap();
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}
