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
    /// Uploads at once (each holds up to a few parts in memory); more get 503.
    pub max_uploads: usize,
}

/// Set on a request once its body was read to the end (or it has none): a
/// whole-request timeout after that is the server's slowness (504), before it
/// the client's (408).
#[derive(Clone, Debug, Default)]
pub struct BodyRead(Arc<std::sync::atomic::AtomicBool>);

impl BodyRead {
    /// Marks the body as read.
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
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
    let read = BodyRead::default();
    let bodyless = matches!(*req.method(), Method::GET | Method::HEAD | Method::DELETE)
        || req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    if bodyless {
        read.set();
    }
    let mut req = req.map(|body| Body::new(TimeoutBody::new(transport.body_idle_timeout, body)));
    req.extensions_mut().insert(read.clone());
    if upload {
        return next.run(req).await;
    }
    match tokio::time::timeout(transport.request_timeout, next.run(req)).await {
        Ok(res) => res,
        Err(_) if read.get() => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "dependency-timeout",
            "the request did not finish in time",
        )
        .into_response(),
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "the request body did not arrive in time",
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
    // HTTP/1 only: hyper bounds an HTTP/1 request's headers, but has no such
    // bound on a cleartext HTTP/2 (h2c) handshake.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(transport.header_timeout)
        .keep_alive(true);
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    fn transport() -> Transport {
        Transport {
            header_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(1),
            max_in_flight: 8,
            max_uploads: 2,
        }
    }

    /// A handler that reads its body (marking it read), then takes `slow`.
    async fn read_then_wait(req: Request) -> StatusCode {
        let read = req.extensions().get::<BodyRead>().cloned();
        match axum::body::to_bytes(req.into_body(), 1024).await {
            Ok(_) => {
                if let Some(read) = read {
                    read.set();
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
                StatusCode::OK
            }
            Err(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn app() -> Router {
        Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    StatusCode::OK
                }),
            )
            .route("/events/t", post(read_then_wait))
            .layer(axum::middleware::from_fn_with_state(
                transport(),
                request_bounds,
            ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_server_is_504_a_slow_body_is_408() {
        let slow_server = app()
            .oneshot(Request::get("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(slow_server.status(), StatusCode::GATEWAY_TIMEOUT);

        let read_then_slow = app()
            .oneshot(Request::post("/events/t").body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_eq!(read_then_slow.status(), StatusCode::GATEWAY_TIMEOUT);

        // A body that never ends: the client's slowness.
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
        let body = Body::from_stream(tokio_stream_of(rx));
        let slow_body = app()
            .oneshot(Request::post("/events/t").body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(slow_body.status(), StatusCode::REQUEST_TIMEOUT);
    }

    fn tokio_stream_of<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send + 'static {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
