//! Revocation propagation between two real nodes on one PostgreSQL: revoke a
//! session on node A (measured from A's acknowledgement), then ask node B until it
//! refuses the token. Prints p50/p99/max over the revocations (default 1000).
//!
//! `cargo bench --bench propagation` (PostgreSQL at TOKENWARDEN_TEST_PG_URL or
//! postgres://postgres@127.0.0.1:5432/test; `PROPAGATION_N` sets the count).

#[path = "../tests/integration/nodes.rs"]
#[allow(dead_code)]
mod nodes;
#[path = "../tests/integration/support.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use support::{Backend, Keys, database, s};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("PROPAGATION_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let db = database(Backend::Postgres)
        .await
        .expect("PostgreSQL is required for this benchmark");
    let store = tokenwarden::store::connect(&db.url).await.expect("connect");
    store.migrate().await.expect("migrate");
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = Keys::all();
    let a = nodes::spawn(&db.url, dir.path(), &keys, "bench-a");
    let b = nodes::spawn(&db.url, dir.path(), &keys, "bench-b");

    let mut sessions = Vec::with_capacity(n);
    for i in 0..n {
        sessions.push(a.open(&format!("user-{}", i % 50)).await);
    }
    // Warm B: every session's state loaded before the clock starts.
    for o in &sessions {
        // (The default rules rate-limit one IP: "deny" is fine, only "revoke" is not.)
        assert_ne!(b.decision(&s(o, "access_token")).await, "revoke");
    }
    let mut delays = Vec::with_capacity(n);
    let mut polls = 0u64;
    for o in &sessions {
        let token = s(o, "access_token");
        a.logout(&s(o, "session_id")).await;
        let acked = Instant::now();
        loop {
            polls += 1;
            if b.decision(&token).await == "revoke" {
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(10),
                "not propagated in 10 s"
            );
        }
        delays.push(acked.elapsed());
    }
    delays.sort();
    let pct =
        |p: f64| delays[((delays.len() as f64 * p).ceil() as usize).clamp(1, delays.len()) - 1];
    println!(
        "revocation propagation node-a -> node-b over {n} revocations (loopback, PostgreSQL LISTEN/NOTIFY)"
    );
    println!("  p50  {:>8.2} ms", pct(0.50).as_secs_f64() * 1e3);
    println!("  p90  {:>8.2} ms", pct(0.90).as_secs_f64() * 1e3);
    println!(
        "  p99  {:>8.2} ms   (target <= 50 ms)",
        pct(0.99).as_secs_f64() * 1e3
    );
    println!(
        "  max  {:>8.2} ms",
        delays[delays.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "  verify calls on node-b: {polls} ({:.2} per revocation)",
        polls as f64 / n as f64
    );
}
