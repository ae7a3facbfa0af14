//! The ceiling the benchmark harness compares against: a bare axum server that
//! answers every route tokenwarden serves with 200 and a small body, reading the
//! request body as tokenwarden does. `cargo run --release --example bench-reference -- PORT`.
//!
//! `-- PORT NANOS` also spins NANOS nanoseconds in each handler: a server doing that
//! much work per request and nothing else, for `bench/budget.py`'s curve of rate
//! against work.

use axum::Router;
use axum::body::Bytes;
use axum::routing::any;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(7000);
    let work = Duration::from_nanos(
        std::env::args()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    );
    let app = Router::new().fallback(any(move |_body: Bytes| async move {
        if !work.is_zero() {
            spin(work);
        }
        r#"{"decision":"allow"}"#
    }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    // Stops on SIGTERM by returning from `main`, as tokenwarden does, so a
    // profile-instrumented build writes its profile (BENCHMARKS.md, PGO).
    axum::serve(listener, app)
        .with_graceful_shutdown(terminated())
        .await
}

/// Busy for `work` of wall time on this thread: work that touches no memory, the
/// cheapest a request's own work can be.
fn spin(work: Duration) {
    let start = Instant::now();
    while start.elapsed() < work {
        std::hint::spin_loop();
    }
}

#[cfg(unix)]
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn terminated() {
    std::future::pending().await
}
