//! Memory per active session: loads N sessions (default 1,000,000) into the live
//! monitor — each bound at sign-in and scored once, from varied addresses and
//! browsers, as real traffic leaves them — and prints the resident memory they
//! add. `cargo run --release --example bench-memory -- [N]`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use tokenwarden::clock::{Clock, SystemClock};
use tokenwarden::enrich::{EnrichConfig, Enricher, UaParser};
use tokenwarden::monitor::{Monitor, RequestInfo};
use tokenwarden::risk::RequestKind;

/// The allocator the service runs with (`src/main.rs`): resident memory depends on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const AGENTS: &[&str] = &[
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
];

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip");
    let enricher = Enricher::new(
        EnrichConfig {
            geoip_city: Some(data.join("GeoIP2-City-Test.mmdb")),
            geoip_asn: Some(data.join("GeoLite2-ASN-Test.mmdb")),
            ..EnrichConfig::default()
        },
        Arc::new(UaParser::new()?),
    )?;
    let clock = Arc::new(SystemClock);
    let monitor = Monitor::new(None, Arc::new(enricher), clock.clone())?;
    // Addresses from the databases' known networks and unknown ones, one per session.
    let ip = |i: usize| -> IpAddr {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        match i % 3 {
            0 => IpAddr::V4(Ipv4Addr::new(81, 2, 69, (142 + i % 50) as u8)),
            1 => IpAddr::V4(Ipv4Addr::new(89, 160, 20, (112 + i % 100) as u8)),
            _ => IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i)),
        }
    };
    // Warm the enrichment caches first: their memory is bounded and not per session.
    for i in 0..10_000 {
        let _ = monitor.enrich(ip(i), AGENTS[i % AGENTS.len()]);
    }
    let before = rss_bytes();
    let started = std::time::Instant::now();
    for i in 0..n {
        let ua = AGENTS[i % AGENTS.len()];
        let (sid, sub) = (
            format!("{:032x}", i as u128 * 0x9e37_79b9),
            format!("user-{}", i / 2),
        );
        monitor.bind(&sid, &sub, monitor.enrich(ip(i), ua));
        let request = RequestInfo {
            ip: Some(ip(i + 7)),
            user_agent: Some(ua.to_owned()),
            method: Some("GET".into()),
            path: Some("/".into()),
            referrer: None,
            origin: None,
            sec_fetch_site: None,
            cost: None,
        };
        let _ = monitor.assess(RequestKind::Request, ("jti", &sid, &sub), &request, false);
        // The write-behind drains the dirty set about once a second.
        if i % 10_000 == 0 {
            let _ = monitor.take_dirty(false);
        }
    }
    let _ = monitor.take_dirty(false);
    let after = rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    println!(
        "sessions: {n}  users: {}  resident memory added: {:.1} MiB  per session: {per:.0} bytes  ({:.1} s, {})",
        n / 2,
        (after - before) as f64 / 1048576.0,
        started.elapsed().as_secs_f64(),
        clock.now()
    );
    println!(
        "target: <= 1024 bytes per session: {}",
        if per <= 1024.0 { "met" } else { "MISSED" }
    );
    Ok(())
}
