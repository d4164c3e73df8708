//! A closed-loop HTTP/1.1 load generator for the gateway benchmark
//! (`scripts/bench-gateway`): `--connections` keep-alive connections, each
//! sending the next `POST` as soon as the previous answer is read, for
//! `--secs` seconds after `--warmup-secs`. Prints one line of JSON: requests
//! per second, p50/p99/max latency in ms, and how many answers were not 2xx.
//!
//! Written here rather than taken from `oha`/`wrk` (neither is served by the
//! registries these machines reach as a binary; building `oha` takes longer
//! than this file) so that both servers see the exact same client.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

struct Args {
    url: hyper::Uri,
    connections: usize,
    secs: u64,
    warmup_secs: u64,
    body: String,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        url: "http://127.0.0.1:8080/events/bench"
            .parse()
            .map_err(|e| format!("{e}"))?,
        connections: 32,
        secs: 10,
        warmup_secs: 2,
        body:
            r#"{"eventType":"order.created","payload":{"orderId":"o-1","amount":42},"key":"o-1"}"#
                .to_string(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => a.url = value.parse().map_err(|e| format!("--url: {e}"))?,
            "--connections" => {
                a.connections = value.parse().map_err(|e| format!("--connections: {e}"))?
            }
            "--secs" => a.secs = value.parse().map_err(|e| format!("--secs: {e}"))?,
            "--warmup-secs" => {
                a.warmup_secs = value.parse().map_err(|e| format!("--warmup-secs: {e}"))?
            }
            "--body" => a.body = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.connections == 0 || a.secs == 0 {
        return Err("--connections and --secs must be at least 1".into());
    }
    Ok(a)
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    latency_us: Option<Histogram<u64>>,
}

async fn connection(
    args: Arc<Args>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<Tally, String> {
    let host = args.url.host().ok_or("url without host")?;
    let port = args.url.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let authority = format!("{host}:{port}");
    let body = Bytes::from(args.body.clone());
    let mut tally = Tally {
        latency_us: Some(Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?),
        ..Tally::default()
    };
    while !stop.load(Ordering::Relaxed) {
        let req = Request::post(args.url.clone())
            .header(hyper::header::HOST, &authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        sender
            .ready()
            .await
            .map_err(|e| format!("connection closed: {e}"))?;
        let started = Instant::now();
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?;
        let took = started.elapsed();
        if measuring.load(Ordering::Relaxed) {
            if status.is_success() {
                tally.ok += 1;
                if let Some(h) = tally.latency_us.as_mut() {
                    h.saturating_record(took.as_micros().max(1) as u64);
                }
            } else {
                tally.failed += 1;
            }
        }
    }
    Ok(tally)
}

#[tokio::main]
async fn main() {
    let args = match args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("http_load: {e}");
            std::process::exit(2);
        }
    };
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| tokio::spawn(connection(args.clone(), measuring.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);

    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let (mut ok, mut failed) = (0u64, 0u64);
    for task in tasks {
        match task.await {
            Ok(Ok(t)) => {
                ok += t.ok;
                failed += t.failed;
                if let Some(h) = t.latency_us {
                    total.add(h).expect("same bounds");
                }
            }
            Ok(Err(e)) => {
                eprintln!("http_load: a connection failed: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("http_load: a connection panicked: {e}");
                std::process::exit(1);
            }
        }
    }
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{{\"requests_per_sec\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"max_ms\":{:.2},\"ok\":{},\"not_2xx\":{}}}",
        ok as f64 / elapsed,
        ms(0.5),
        ms(0.99),
        total.max() as f64 / 1000.0,
        ok,
        failed
    );
}
