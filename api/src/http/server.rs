//! The HTTP/1.1 server under the routes: poem's endpoint served by hyper directly, because poem's own server gives
//! no bound on how long a client may take to send a request head. Without one, a client that opens connections and
//! sends a header byte every few seconds (slowloris) holds them open for ever and starves everyone else.
//!
//! Every connection must deliver a complete request head within `header_timeout` of opening, and again within
//! `header_timeout` of each answer (an idle keep-alive connection is closed then too). On shutdown the listener
//! stops accepting, each connection finishes the request it is serving and closes, and after `grace` the rest are
//! dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Addr, Endpoint, EndpointExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The body type poem's responses convert into for hyper.
type ResponseBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

/// How the server treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A request head must be complete this long after the connection opened or answered its last request.
    pub header_timeout: Duration,
    /// How long requests in flight may run on after shutdown began.
    pub grace: Duration,
}

/// Serves `endpoint` on `listener` until `shutdown` completes, then drains as [`ConnectionLimits`] says.
///
/// # Errors
/// Never at present: a failed `accept` (too many open files, a connection reset before it was accepted) is
/// logged and the next connection accepted; the `Result` is kept for listener failures to come.
pub async fn serve<E>(
    listener: TcpListener,
    endpoint: E,
    shutdown: impl Future<Output = ()> + Send,
    limits: ConnectionLimits,
) -> std::io::Result<()>
where
    E: Endpoint + 'static,
{
    let endpoint: Arc<dyn poem::endpoint::DynEndpoint<Output = poem::Response>> =
        Arc::new(poem::endpoint::ToDynEndpoint(endpoint.map_to_response()));
    let local = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(
                        stream,
                        local,
                        remote,
                        endpoint.clone(),
                        stopped.clone(),
                        limits.header_timeout,
                    ));
                }
                Err(error) => {
                    tracing::warn!(error = %error, "could not accept a connection");
                    // A full file table fails every accept at once: give connections a moment to close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections as we go, so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(limits.grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            grace_s = limits.grace.as_secs(),
            "requests still in flight after the shutdown grace; dropping them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    local: SocketAddr,
    remote: SocketAddr,
    endpoint: Arc<dyn poem::endpoint::DynEndpoint<Output = poem::Response>>,
    mut stopped: watch::Receiver<bool>,
    header_timeout: Duration,
) {
    let service = hyper::service::service_fn(move |request: poem::http::Request<Incoming>| {
        let endpoint = endpoint.clone();
        async move {
            let request = poem::Request::from((
                request,
                LocalAddr(Addr::SocketAddr(local)),
                RemoteAddr(Addr::SocketAddr(remote)),
                poem::http::uri::Scheme::HTTP,
            ));
            let response: poem::http::Response<ResponseBody> =
                endpoint.get_response(request).await.into();
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let stop_requested = async move {
        // The guard `wait_for` returns is not `Send`: drop it before the connection is awaited again.
        let _ = stopped.wait_for(|stopped| *stopped).await.map(|_| ());
    };
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                // A header timeout, a client that went away, a malformed request: the connection's, not ours.
                tracing::debug!(remote = %remote, error = %error, "connection closed");
            }
            return;
        }
        () = stop_requested => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}
