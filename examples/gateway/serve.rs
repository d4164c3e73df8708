//! The connection loop: hyper-util with a timer, so that no phase of a request
//! can hold a connection for ever, and a shutdown that closes what is left at
//! its deadline.
//!
//! `axum::serve` gives hyper no timer, which turns hyper's header-read timeout
//! off: a client that sends half a request line keeps its connection (and a
//! task) for as long as it likes, and graceful shutdown waits for it. Here:
//!
//! - headers must arrive within `header_timeout` (hyper closes the connection);
//! - a request body that sends nothing for `body_idle_timeout` fails with 408
//!   (tower-http's `TimeoutBody`), which also aborts an upload's multipart upload;
//! - every route but uploads has a whole-request bound (`request_timeout`, 408),
//!   uploads only the idle bound (they may be large and slow, never stalled);
//! - on shutdown the listener closes, connections are told to finish their
//!   request in flight, and whatever is still open at the drain deadline is
//!   closed, so one stalled client cannot hold the process.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::Service;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use crate::problem::Problem;

/// Bounds of the transport (see main.rs for the variables and defaults).
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    /// A connection must send a request's headers within this.
    pub header_timeout: Duration,
    /// A request body that sends nothing this long fails (408).
    pub body_idle_timeout: Duration,
    /// Whole-request bound of every route but uploads (408).
    pub request_timeout: Duration,
    /// API requests at once; more are shed with 503.
    pub max_in_flight: usize,
}

/// How the server stopped.
#[derive(Debug, Default)]
pub struct Drained {
    /// Connections still open at the drain deadline, closed then.
    pub closed_at_deadline: usize,
}

/// `true` when `err` or one of its causes is a `T`.
pub fn caused_by<T: StdError + 'static>(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<T>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// `true` when the request body stalled past the idle timeout.
pub fn body_stalled(err: &(dyn StdError + 'static)) -> bool {
    caused_by::<TimeoutError>(err)
}

/// A 408 for a body that sent nothing for too long.
pub fn body_stalled_problem() -> Problem {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "request-timeout",
        "the request body sent nothing for too long",
    )
}

fn is_upload(req: &Request) -> bool {
    req.method() == Method::PUT && req.uri().path().starts_with("/files/")
}

/// Middleware: the body's idle bound on every request, the whole-request bound
/// on all but uploads.
pub async fn request_bounds(
    State(transport): State<Transport>,
    req: Request,
    next: Next,
) -> Response {
    let upload = is_upload(&req);
    let req = req.map(|body| Body::new(TimeoutBody::new(transport.body_idle_timeout, body)));
    if upload {
        return next.run(req).await;
    }
    match tokio::time::timeout(transport.request_timeout, next.run(req)).await {
        Ok(res) => res,
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "the request did not finish in time",
        )
        .into_response(),
    }
}

/// Serves `app` on `listener` until `stop` turns true; then drains for at most
/// `drain` and closes the connections left.
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    transport: Transport,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> Drained
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(transport.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(transport.header_timeout));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(target: "gateway::http", error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(
                    tower::ServiceExt::map_request(app.clone(), |req: hyper::Request<hyper::body::Incoming>| req.map(Body::new)),
                );
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let watched = graceful.watch(conn);
                connections.spawn(async move {
                    if let Err(e) = watched.await {
                        tracing::debug!(target: "gateway::http", error = %e, "connection ended with an error");
                    }
                });
            }
            // Reap finished connections so the set stays the size of the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    let open = connections.len();
    tracing::info!(target: "gateway::http", open, drain_ms = drain.as_millis() as u64, "draining connections");
    let mut drained = Drained::default();
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        drained.closed_at_deadline = connections.len();
        tracing::warn!(
            target: "gateway::http",
            closed = drained.closed_at_deadline,
            "connections still open at the drain deadline: closed"
        );
    }
    connections.shutdown().await;
    drained
}
