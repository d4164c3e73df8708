//! A fault-injecting HTTP/1.1 proxy for S3 tests.
//!
//! It listens on 127.0.0.1, reads one request per connection, forwards it to the
//! real server with `Connection: close` (so every request has its own connection
//! and its end is the connection's end), and pipes the answer back. Path-style
//! requests keep their `Host` header, so SigV4 signatures made for the proxy's
//! address still verify at the server. Faults are armed per kind of request:
//!
//! - answer `503 SlowDown` with an S3 XML error body to the next N matching requests;
//! - forward the first B bytes of the body of the next N matching requests, then cut
//!   both connections;
//! - forward the next N matching requests, then cut the answer after B bytes;
//! - forward the next N matching requests whole, let the server answer, and cut the
//!   connection before any byte of the answer reaches the client (a lost answer);
//! - read the next N matching requests whole and never answer (a stalled request);
//! - forward the next N matching requests, send B bytes of the answer's body, then
//!   hold the connection open without sending more (a body stalled mid-way);
//! - forward the next N matching requests without their `Range` header (a server
//!   that ignores Range and answers with the whole object);
//! - the same without the answer's `Content-Length` (the body ends when the
//!   connection closes), so only the client's own count can stop it;
//! - answer the next N matching requests with another `Content-Length` in the
//!   head (a HEAD claiming an absurd size);
//! - throttle every request body and answer body to a rate (bytes per second).
//!
//! It logs every request (method, target, status, fault) and counts how many
//! UploadPart requests were in flight at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Which requests a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matcher {
    /// Every request.
    Any,
    /// UploadPart: `PUT ...?partNumber=..&uploadId=..`.
    UploadPart,
    /// A GET with a `Range` header (a ranged download).
    RangedGet,
    /// CompleteMultipartUpload: `POST ...?uploadId=..`.
    CompleteMultipartUpload,
    /// CreateMultipartUpload: `POST ...?uploads`.
    CreateMultipartUpload,
    /// Any GET (an object download).
    Get,
    /// HeadObject.
    Head,
}

impl Matcher {
    fn matches(self, head: &RequestHead) -> bool {
        match self {
            Matcher::Any => true,
            Matcher::UploadPart => head.is_upload_part(),
            Matcher::RangedGet => {
                head.method == "GET"
                    && head
                        .raw_lines
                        .iter()
                        .any(|l| l.to_ascii_lowercase().starts_with("range:"))
            }
            Matcher::CompleteMultipartUpload => {
                head.method == "POST" && head.target.contains("uploadId=")
            }
            Matcher::CreateMultipartUpload => {
                head.method == "POST"
                    && (head.target.ends_with("?uploads")
                        || head.target.contains("?uploads&")
                        || head.target.contains("&uploads"))
            }
            Matcher::Get => head.method == "GET",
            Matcher::Head => head.method == "HEAD",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum FaultKind {
    SlowDown,
    CutBody { after: u64 },
    CutResponse { after: u64 },
    LoseAnswer,
    Stall,
    StallResponse { after: u64 },
    IgnoreRange { hide_length: bool },
    ClaimLength { length: u64 },
}

#[derive(Debug)]
struct Fault {
    kind: FaultKind,
    matcher: Matcher,
    remaining: usize,
}

/// One request the proxy saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Status answered (by the server or the proxy); `None` when cut.
    pub status: Option<u16>,
    /// The fault applied, if any: "slow_down", "cut", "cut_response",
    /// "lose_answer" or "stall".
    pub fault: Option<&'static str>,
}

impl Seen {
    /// Whether this was an AbortMultipartUpload.
    pub fn is_abort(&self) -> bool {
        self.method == "DELETE" && self.target.contains("uploadId=")
    }

    /// Whether this was an UploadPart.
    pub fn is_upload_part(&self) -> bool {
        self.method == "PUT"
            && self.target.contains("partNumber=")
            && self.target.contains("uploadId=")
    }
}

#[derive(Debug, Default)]
struct State {
    faults: Mutex<Vec<Fault>>,
    seen: Mutex<Vec<Seen>>,
    parts_in_flight: AtomicUsize,
    max_parts_in_flight: AtomicUsize,
    /// Bytes per second for every body in either direction; 0: no limit.
    rate: AtomicU64,
    /// Bytes of answer bodies sent to clients.
    answered_bytes: AtomicU64,
}

/// The proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    address: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy to the server at `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let state = Arc::new(State::default());
        let task = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                loop {
                    let Ok((downstream, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = Arc::clone(&state);
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let _ = handle(downstream, &upstream, &state).await;
                    });
                }
            }
        });
        FaultProxy {
            address,
            state,
            task,
        }
    }

    /// The endpoint to give the SDK: `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Answers `503 SlowDown` to the next `count` requests that `matcher` matches.
    pub fn slow_down(&self, matcher: Matcher, count: usize) {
        self.arm(FaultKind::SlowDown, matcher, count);
    }

    /// Cuts the next `count` matching requests after `after` bytes of their body.
    pub fn cut_body(&self, matcher: Matcher, count: usize, after: u64) {
        self.arm(FaultKind::CutBody { after }, matcher, count);
    }

    /// Forwards the next `count` matching requests, then cuts their answer after
    /// `after` bytes of its body.
    pub fn cut_response(&self, matcher: Matcher, count: usize, after: u64) {
        self.arm(FaultKind::CutResponse { after }, matcher, count);
    }

    /// Forwards the next `count` matching requests and lets the server act on
    /// them, then cuts the connection before the client gets any of the answer.
    pub fn lose_answer(&self, matcher: Matcher, count: usize) {
        self.arm(FaultKind::LoseAnswer, matcher, count);
    }

    /// Reads the next `count` matching requests (head and body) and never answers;
    /// the connection stays open until the client closes it.
    pub fn stall(&self, matcher: Matcher, count: usize) {
        self.arm(FaultKind::Stall, matcher, count);
    }

    fn arm(&self, kind: FaultKind, matcher: Matcher, remaining: usize) {
        self.state.faults.lock().unwrap().push(Fault {
            kind,
            matcher,
            remaining,
        });
    }

    /// Forwards the next `count` matching requests, sends `after` bytes of the
    /// answer's body, then holds the connection open and sends nothing more.
    pub fn stall_response(&self, matcher: Matcher, count: usize, after: u64) {
        self.arm(FaultKind::StallResponse { after }, matcher, count);
    }

    /// Forwards the next `count` matching requests without their `Range` header:
    /// the server answers with the whole object.
    pub fn ignore_range(&self, matcher: Matcher, count: usize) {
        self.arm(
            FaultKind::IgnoreRange { hide_length: false },
            matcher,
            count,
        );
    }

    /// Like [`ignore_range`](Self::ignore_range), and drops the answer's
    /// `Content-Length`: the whole object follows, ended by the connection's close.
    pub fn ignore_range_without_length(&self, matcher: Matcher, count: usize) {
        self.arm(FaultKind::IgnoreRange { hide_length: true }, matcher, count);
    }

    /// Answers the next `count` matching requests with `Content-Length: length`
    /// in the head (the body, if any, is forwarded as the server sent it).
    pub fn claim_length(&self, matcher: Matcher, count: usize, length: u64) {
        self.arm(FaultKind::ClaimLength { length }, matcher, count);
    }

    /// Limits every request body and answer body from now on to `bytes_per_second`
    /// (0: no limit).
    pub fn throttle(&self, bytes_per_second: u64) {
        self.state.rate.store(bytes_per_second, Ordering::SeqCst);
    }

    /// Bytes of answer bodies sent to clients so far (after the answer heads).
    pub fn answered_bytes(&self) -> u64 {
        self.state.answered_bytes.load(Ordering::SeqCst)
    }

    /// Removes every armed fault.
    pub fn disarm(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    /// Every request seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The most UploadPart requests in flight at once.
    pub fn max_parts_in_flight(&self) -> usize {
        self.state.max_parts_in_flight.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct RequestHead {
    method: String,
    target: String,
    content_length: Option<u64>,
    /// The head as received, minus any `Connection` header and the final blank line.
    raw_lines: Vec<String>,
}

impl RequestHead {
    fn is_upload_part(&self) -> bool {
        self.method == "PUT"
            && self.target.contains("partNumber=")
            && self.target.contains("uploadId=")
    }
}

/// Reads an HTTP head (up to and including the blank line); returns it and any
/// bytes read past it.
async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut buffer: Vec<u8>,
) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buffer, b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            let head = String::from_utf8_lossy(&buffer).into_owned();
            return Ok(Some((head, rest)));
        }
        if buffer.len() > 256 * 1024 {
            return Err(std::io::Error::other("head too large"));
        }
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_request(head: &str) -> RequestHead {
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut content_length = None;
    let mut raw_lines = vec![request_line.clone()];
    for line in lines {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") {
            continue;
        }
        if let Some(value) = lower.strip_prefix("content-length:") {
            content_length = value.trim().parse().ok();
        }
        raw_lines.push(line.to_string());
    }
    RequestHead {
        method,
        target,
        content_length,
        raw_lines,
    }
}

struct PartFlight<'a>(&'a State);

impl Drop for PartFlight<'_> {
    fn drop(&mut self) {
        self.0.parts_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(mut downstream: TcpStream, upstream: &str, state: &State) -> std::io::Result<()> {
    let Some((head, early_body)) = read_head(&mut downstream, Vec::new()).await? else {
        return Ok(());
    };
    let request = parse_request(&head);
    // An UploadPart is in flight from its head's arrival until the client has its
    // whole answer (not until the server closes the connection, which may lag).
    let mut flight = request.is_upload_part().then(|| {
        let now = state.parts_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_parts_in_flight.fetch_max(now, Ordering::SeqCst);
        PartFlight(state)
    });
    let fault = {
        let mut faults = state.faults.lock().unwrap();
        let found = faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.matcher.matches(&request));
        found.map(|f| {
            f.remaining -= 1;
            f.kind
        })
    };
    let index = {
        let mut seen = state.seen.lock().unwrap();
        seen.push(Seen {
            method: request.method.clone(),
            target: request.target.clone(),
            status: None,
            fault: match fault {
                Some(FaultKind::SlowDown) => Some("slow_down"),
                Some(FaultKind::CutBody { .. }) => Some("cut"),
                Some(FaultKind::CutResponse { .. }) => Some("cut_response"),
                Some(FaultKind::LoseAnswer) => Some("lose_answer"),
                Some(FaultKind::Stall) => Some("stall"),
                Some(FaultKind::StallResponse { .. }) => Some("stall_response"),
                Some(FaultKind::IgnoreRange { .. }) => Some("ignore_range"),
                Some(FaultKind::ClaimLength { .. }) => Some("claim_length"),
                None => None,
            },
        });
        seen.len() - 1
    };
    let body_length = request.content_length.unwrap_or(0);
    match fault {
        Some(FaultKind::SlowDown) => {
            // Drain the body so the client is not cut off while still sending.
            let mut remaining = body_length.saturating_sub(early_body.len() as u64);
            let mut sink = [0u8; 64 * 1024];
            while remaining > 0 {
                let n = downstream.read(&mut sink).await?;
                if n == 0 {
                    break;
                }
                remaining = remaining.saturating_sub(n as u64);
            }
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><RequestId>keel-fault-proxy</RequestId></Error>";
            let response = format!(
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            downstream.write_all(response.as_bytes()).await?;
            downstream.shutdown().await?;
            state.seen.lock().unwrap()[index].status = Some(503);
            return Ok(());
        }
        Some(FaultKind::CutBody { after }) => {
            let mut upstream_conn = TcpStream::connect(upstream).await?;
            write_head(&mut upstream_conn, &request).await?;
            let early = &early_body[..early_body.len().min(after as usize)];
            upstream_conn.write_all(early).await?;
            let mut remaining = after.saturating_sub(early.len() as u64);
            let mut limited = (&mut downstream).take(remaining);
            remaining -= tokio::io::copy(&mut limited, &mut upstream_conn)
                .await?
                .min(remaining);
            let _ = remaining;
            // Drop both connections mid-body: the client sees a reset, the server a
            // truncated request.
            drop(upstream_conn);
            drop(downstream);
            return Ok(());
        }
        Some(FaultKind::Stall) => {
            // Read everything the client sends, answer nothing, until it gives up.
            let mut sink = [0u8; 64 * 1024];
            while downstream.read(&mut sink).await? > 0 {}
            return Ok(());
        }
        Some(FaultKind::LoseAnswer) => {
            let mut upstream_conn = TcpStream::connect(upstream).await?;
            write_head(&mut upstream_conn, &request).await?;
            upstream_conn.write_all(&early_body).await?;
            let remaining = body_length.saturating_sub(early_body.len() as u64);
            tokio::io::copy(&mut (&mut downstream).take(remaining), &mut upstream_conn).await?;
            // The server has the whole request; wait for its answer, then lose it.
            let mut carry = Vec::new();
            while let Some((response_head, rest)) = read_head(&mut upstream_conn, carry).await? {
                let status: Option<u16> =
                    response_head.split(' ').nth(1).and_then(|s| s.parse().ok());
                if status.is_some_and(|s| s < 200) {
                    carry = rest;
                    continue;
                }
                state.seen.lock().unwrap()[index].status = status;
                break;
            }
            drop(upstream_conn);
            drop(downstream);
            return Ok(());
        }
        Some(
            FaultKind::CutResponse { .. }
            | FaultKind::StallResponse { .. }
            | FaultKind::IgnoreRange { .. }
            | FaultKind::ClaimLength { .. },
        )
        | None => {}
    }
    let mut request = request;
    if matches!(fault, Some(FaultKind::IgnoreRange { .. })) {
        request
            .raw_lines
            .retain(|l| !l.to_ascii_lowercase().starts_with("range:"));
    }
    let (cut_answer_after, stall_answer) = match fault {
        Some(FaultKind::CutResponse { after }) => (Some(after), false),
        Some(FaultKind::StallResponse { after }) => (Some(after), true),
        _ => (None, false),
    };
    let mut upstream_conn = TcpStream::connect(upstream).await?;
    write_head(&mut upstream_conn, &request).await?;
    upstream_conn.write_all(&early_body).await?;
    let (mut down_read, mut down_write) = downstream.into_split();
    let (mut up_read, mut up_write) = upstream_conn.into_split();
    let remaining = body_length.saturating_sub(early_body.len() as u64);
    let send_body = async move {
        let mut limited = (&mut down_read).take(remaining);
        copy_paced(&mut limited, &mut up_write, state, false).await?;
        up_write.flush().await?;
        // Keep the upstream write half open: some servers close on a half-close.
        Ok::<_, std::io::Error>(up_write)
    };
    let send_answer = async {
        let mut carry = Vec::new();
        loop {
            let Some((response_head, rest)) =
                read_head(&mut up_read, std::mem::take(&mut carry)).await?
            else {
                return Ok::<_, std::io::Error>(());
            };
            let status: Option<u16> = response_head.split(' ').nth(1).and_then(|s| s.parse().ok());
            let informational = status.is_some_and(|s| s < 200);
            let answer_length = response_head.split("\r\n").find_map(|l| {
                let lower = l.to_ascii_lowercase();
                lower
                    .strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            let rewritten = if informational {
                response_head
            } else {
                let rewrite_length = matches!(
                    fault,
                    Some(
                        FaultKind::IgnoreRange { hide_length: true }
                            | FaultKind::ClaimLength { .. }
                    )
                );
                let mut lines: Vec<String> = response_head
                    .split("\r\n")
                    .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
                    .filter(|l| {
                        !(rewrite_length && l.to_ascii_lowercase().starts_with("content-length:"))
                    })
                    .map(str::to_string)
                    .collect();
                if let Some(FaultKind::ClaimLength { length }) = fault {
                    lines.push(format!("Content-Length: {length}"));
                }
                lines.push("Connection: close".to_string());
                format!("{}\r\n\r\n", lines.join("\r\n"))
            };
            down_write.write_all(rewritten.as_bytes()).await?;
            if informational {
                carry = rest;
                continue;
            }
            state.seen.lock().unwrap()[index].status = status;
            if let Some(after) = cut_answer_after {
                // Send part of the body, then drop the connection mid-answer (or
                // hold it open, silent, until the client gives up).
                let early = &rest[..rest.len().min(after as usize)];
                down_write.write_all(early).await?;
                state
                    .answered_bytes
                    .fetch_add(early.len() as u64, Ordering::SeqCst);
                let left = after - early.len() as u64;
                copy_paced(&mut (&mut up_read).take(left), &mut down_write, state, true).await?;
                if stall_answer {
                    down_write.flush().await?;
                    // The client's read half closes when it gives up.
                    std::future::pending::<()>().await;
                }
                return Ok(());
            }
            copy_paced(&mut &rest[..], &mut down_write, state, true).await?;
            if let Some(length) = answer_length {
                let left = length.saturating_sub(rest.len() as u64);
                copy_paced(&mut (&mut up_read).take(left), &mut down_write, state, true).await?;
                down_write.flush().await?;
                drop(flight.take());
            }
            copy_paced(&mut up_read, &mut down_write, state, true).await?;
            down_write.shutdown().await?;
            return Ok(());
        }
    };
    let (sent, answered) = tokio::join!(send_body, send_answer);
    drop(sent);
    answered
}

/// Copies `reader` to `writer` at the proxy's rate (all at once without one);
/// counts answer bytes when `answer`.
async fn copy_paced<R, W>(
    reader: &mut R,
    writer: &mut W,
    state: &State,
    answer: bool,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: tokio::io::AsyncWrite + Unpin + ?Sized,
{
    let mut buffer = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    let started = tokio::time::Instant::now();
    loop {
        let rate = state.rate.load(Ordering::SeqCst);
        let size = if rate == 0 {
            buffer.len()
        } else {
            buffer.len().min((rate as usize / 16).max(1))
        };
        let n = reader.read(&mut buffer[..size]).await?;
        if n == 0 {
            return Ok(total);
        }
        writer.write_all(&buffer[..n]).await?;
        total += n as u64;
        if answer {
            state.answered_bytes.fetch_add(n as u64, Ordering::SeqCst);
        }
        if rate > 0 {
            // Sleep until the bytes sent so far fit the rate.
            let due = started + std::time::Duration::from_secs_f64(total as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
}

async fn write_head(upstream: &mut TcpStream, request: &RequestHead) -> std::io::Result<()> {
    let mut head = request.raw_lines.join("\r\n");
    head.push_str("\r\nConnection: close\r\n\r\n");
    upstream.write_all(head.as_bytes()).await
}
