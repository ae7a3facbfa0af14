//! Micro-benchmarks of the verification path: token decode per algorithm (never
//! seen and cached), enrichment alone, one risk evaluation (default rules), one
//! full decision through `SessionService::verify` (decode, revocation view,
//! enrichment, rules, on a real SQLite store that it never touches), replay per
//! event, one audit event's JSON line, and batches of audit events stored on SQLite. Run with `cargo bench
//! --bench engine`; compare the figures side by side.

use std::hint::black_box;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tokenwarden::clock::{Clock, ManualClock};
use tokenwarden::config::{FileConfig, KeyAlgorithm, KeyEntry, Settings};
use tokenwarden::enrich::{EnrichConfig, Enricher, UaParser};
use tokenwarden::monitor::DEFAULT_RULES;
use tokenwarden::risk::state::{SessionState, UserState, assess};
use tokenwarden::risk::{RateLimiters, RequestContext, RequestKind, RuleSet};
use tokenwarden::token::{AccessClaims, KeySet, TokenCodec};

const UA: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";

fn codec(dir: &std::path::Path, alg: KeyAlgorithm) -> TokenCodec {
    let path = dir.join(format!("{alg}"));
    tokenwarden::token::write_private(&path, tokenwarden::token::generate(alg).unwrap().as_bytes())
        .unwrap();
    let keys = KeySet::load(
        &[KeyEntry {
            kid: "k".into(),
            alg,
            path,
        }],
        None,
    )
    .unwrap();
    let settings = Settings::resolve(FileConfig::default(), &Default::default()).unwrap();
    TokenCodec::new(keys, &settings.tokens)
}

fn claims(now: i64) -> AccessClaims {
    AccessClaims {
        iss: "tokenwarden".into(),
        aud: "tokenwarden".into(),
        sub: "alice".into(),
        jti: "jti-0123456789abcdef".into(),
        sid: "0b6f4f3e-8f5a-4c43-9d0b-3a7f1c2e9d11".into(),
        iat: now,
        nbf: None,
        exp: now + 300,
        auth_time: now,
        bnd: "uaUiamZLuU9vQFCDFmqtww".into(),
        generation: 0,
        epoch: 0,
        acr: None,
        amr: None,
        extra: Default::default(),
        foreign: false,
        cleared: Default::default(),
    }
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let now = 1_800_000_000;
    for alg in [
        KeyAlgorithm::HS512,
        KeyAlgorithm::ES256,
        KeyAlgorithm::EdDSA,
    ] {
        let codec = codec(dir.path(), alg);
        let token = codec.mint(&claims(now)).unwrap();
        // Never-seen tokens: each iteration verifies a new one, minted outside the timing.
        let mut i = 0u64;
        c.bench_function(&format!("token_decode_{alg}"), |b| {
            b.iter_batched(
                || {
                    i += 1;
                    let mut c = claims(now);
                    c.jti = format!("jti-{i}");
                    codec.mint(&c).unwrap()
                },
                |t| codec.verify(black_box(&t), now),
                BatchSize::SmallInput,
            )
        });
        c.bench_function(&format!("token_decode_cached_{alg}"), |b| {
            b.iter(|| codec.verify(black_box(&token), now).unwrap())
        });
    }

    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip");
    let enricher = Enricher::new(
        EnrichConfig {
            geoip_city: Some(data.join("GeoIP2-City-Test.mmdb")),
            geoip_asn: Some(data.join("GeoLite2-ASN-Test.mmdb")),
            ..EnrichConfig::default()
        },
        Arc::new(UaParser::new().unwrap()),
    )
    .unwrap();
    let ip: IpAddr = "81.2.69.142".parse().unwrap();
    let _ = enricher.enrich(ip, UA);
    c.bench_function("enrich_cached", |b| {
        b.iter(|| enricher.enrich(black_box(ip), black_box(UA)))
    });

    let rules = RuleSet::parse("default", DEFAULT_RULES).unwrap();
    let clock = Arc::new(ManualClock::at(now));
    let limiters = RateLimiters::new(clock.clone(), 100_000);
    let home = enricher.enrich(ip, UA);
    let mut session = SessionState::opened("alice", home.clone(), clock.now_millis());
    let mut user = UserState::default();
    user.learn(&home);
    c.bench_function("evaluation_full_default_rules", |b| {
        b.iter(|| {
            clock.advance(std::time::Duration::from_millis(50));
            let client = Arc::new(enricher.enrich(black_box(ip), black_box(UA)));
            let ctx = RequestContext {
                kind: RequestKind::Request,
                at_ms: clock.now_millis(),
                client: &client,
                method: Some("GET"),
                path: Some("/api/items"),
                referrer: None,
                origin: None,
                sec_fetch_site: None,
                cost: 1,
                jti: "jti-0123456789abcdef",
                sid: "0b6f4f3e-8f5a-4c43-9d0b-3a7f1c2e9d11",
                sub: "alice",
                refresh_reused: false,
            };
            assess(&rules, &limiters, &ctx, &mut session, &mut user)
        })
    });
}

/// One full decision: what `/v1/verify` does after parsing the body.
fn decision(c: &mut Criterion) {
    use tokenwarden::monitor::{Monitor, RequestInfo};
    use tokenwarden::session::SessionService;
    use tokenwarden::session::input::{AuthContext, Client, Subject};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip");
    let clock = Arc::new(ManualClock::at(1_800_000_000));
    let service = rt.block_on(async {
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store = tokenwarden::store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let enricher = Enricher::new(
            EnrichConfig {
                geoip_city: Some(data.join("GeoIP2-City-Test.mmdb")),
                geoip_asn: Some(data.join("GeoLite2-ASN-Test.mmdb")),
                ..EnrichConfig::default()
            },
            Arc::new(UaParser::new().unwrap()),
        )
        .unwrap();
        let monitor = Arc::new(Monitor::new(None, Arc::new(enricher), clock.clone()).unwrap());
        let settings = Settings::resolve(FileConfig::default(), &Default::default()).unwrap();
        SessionService::start(
            store,
            codec(dir.path(), KeyAlgorithm::HS512),
            monitor,
            clock.clone(),
            settings.tokens,
        )
        .await
        .unwrap()
    });
    let ip: IpAddr = "81.2.69.142".parse().unwrap();
    let client = Client {
        ip,
        user_agent: UA.into(),
    };
    let open = || {
        rt.block_on(service.open(
            &Subject::parse("alice").unwrap(),
            &client,
            &AuthContext::parse(None, None, None).unwrap(),
        ))
        .unwrap()
        .access_token
    };
    let request = RequestInfo {
        ip: Some(ip),
        user_agent: Some(UA.into()),
        method: Some("GET".into()),
        path: Some("/account".into()),
        referrer: None,
        origin: None,
        sec_fetch_site: None,
        cost: None,
    };
    // 200 ms between requests keeps the session under the default rate rules; a new
    // session (opened outside the timing) every 1000 requests keeps its token alive.
    c.bench_function("decision_full_HS512_seen_token", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut token = open();
            for i in 0..iters {
                if i % 1000 == 999 {
                    token = open();
                }
                clock.advance(std::time::Duration::from_millis(200));
                let started = std::time::Instant::now();
                let verdict = rt.block_on(service.verify(black_box(&token), &request)).unwrap();
                total += started.elapsed();
                assert!(
                    matches!(&verdict, tokenwarden::session::Verdict::Assessed(_, e) if e.decision == tokenwarden::risk::Decision::Allow),
                    "the whole path, every time"
                );
            }
            total
        })
    });
}

/// Replay cost per event: 1,000 sessions, each opened and then used 9 times.
fn replay_events(c: &mut Criterion) {
    use tokenwarden::replay::{OnError, ReplayContext, replay};
    let mut lines = String::new();
    let cities = [
        ("GB", "London", 51.5142, -0.0931, "81.2.69.142"),
        ("SE", "Linköping", 58.4167, 15.6167, "89.160.20.128"),
        ("US", "Milton", 47.2513, -122.3149, "216.160.83.56"),
    ];
    for step in 0..10 {
        for s in 0..1000 {
            let (country, city, lat, lon, ip) =
                cities[(s + usize::from(step == 9 && s % 50 == 0)) % 3];
            let kind = if step == 0 { "session_open" } else { "request" };
            let ms = 1_800_000_000_000i64 + (step * 1000 + s) as i64 * 250;
            let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            lines.push_str(&format!(
                r#"{{"ts":"{ts}","kind":"{kind}","session_id":"s-{s}","subject":"u-{}","user_agent":"{UA}","decision":"allow","ip":"{ip}","country":"{country}","city":"{city}","latitude":{lat},"longitude":{lon},"radius_km":20.0,"asn":1221,"method":"GET","path":"/account"}}"#,
                s / 2
            ));
            lines.push('\n');
        }
    }
    let ua = UaParser::new().unwrap();
    let mut group = c.benchmark_group("replay");
    group.throughput(criterion::Throughput::Elements(10_000));
    group.bench_function("replay_10000_events_default_rules", |b| {
        b.iter(|| {
            replay(
                lines.as_bytes(),
                RuleSet::parse("default", DEFAULT_RULES).unwrap(),
                None,
                ReplayContext {
                    ua: &ua,
                    geo: None,
                    on_error: OnError::Stop,
                },
                None,
                |_| {},
            )
            .unwrap()
        })
    });
    group.finish();
}

/// Storing the audit log on SQLite: batches of 2,000 events of the shape forward-auth
/// writes (about 430 bytes of JSON each), through the store as the event writer
/// calls it, into a file that grows as in service (its WAL checkpoints included).
fn audit_batches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    let store = rt.block_on(async {
        let store = tokenwarden::store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        store
    });
    let mut group = c.benchmark_group("audit");
    // One event's JSON line, as forward-auth records it: serde_json's writer and
    // the event's own, side by side.
    use tokenwarden::enrich::{DeviceClass, UaFingerprint};
    use tokenwarden::events::{Event, EventKind, EventRef, IpRef, UaRef};
    let fingerprint = Arc::new(UaFingerprint::new(
        "Firefox".into(),
        Some("133".into()),
        "Linux".into(),
        DeviceClass::Desktop,
    ));
    let recorded = {
        let mut e = EventRef::new(EventKind::Request, 1_800_000_000_000)
            .session("ses_0000000000000000000007", "user-7")
            .decision("allow");
        e.ip = Some(IpRef::Addr([10, 7, 3, 7].into()));
        e.user_agent = Some(UA);
        e.method = Some("GET");
        e.path = Some("/account");
        e.score = Some(0);
        e.session_risk = Some(0.0);
        e.rules_hash = Some("0123456789abcdef");
        e.country = Some("SE");
        e.city = Some("Linköping");
        e.asn = Some(1221);
        e.latitude = Some(58.4167);
        e.longitude = Some(15.6167);
        e.radius_km = Some(20.0);
        e.ua_fingerprint = Some(UaRef::Shared(&fingerprint));
        e
    };
    // The same event as serde_json sees it (read back from a line).
    let event = Event::from(recorded.clone());
    let mut line = Vec::with_capacity(1024);
    group.bench_function("json_line_serde_json", |b| {
        b.iter(|| {
            line.clear();
            serde_json::to_writer(&mut line, black_box(&event)).unwrap();
            black_box(line.len())
        })
    });
    let mut text = String::with_capacity(1024);
    group.bench_function("json_line_written", |b| {
        b.iter(|| {
            text.clear();
            black_box(&recorded).write_json(&mut text).unwrap();
            black_box(text.len())
        })
    });
    let mut ts = 1_800_000_000_000i64;
    group.throughput(criterion::Throughput::Elements(2_000));
    group.bench_function("store_2000_events_sqlite", |b| {
        b.iter_batched(
            || {
                (0..2_000)
                    .map(|i| {
                        ts += 1;
                        let sid = format!("ses_{:022}", i * 7 % 10_000);
                        tokenwarden::store::StoredEvent {
                            ts_ms: ts,
                            kind: "request".into(),
                            session_id: Some(sid.clone()),
                            subject: Some(format!("user-{}", i % 5_000)),
                            decision: Some("allow".into()),
                            event: format!(
                                r#"{{"ts":"2027-01-15T08:00:00.000Z","kind":"request","session_id":"{sid}","subject":"user-{}","ip":"10.{}.{}.7","user_agent":"{UA}","method":"GET","path":"/account","decision":"allow","score":0,"session_risk":0.0,"rules_hash":"0123456789abcdef","country":"SE","city":"Linköping","asn":1221,"latitude":58.4167,"longitude":15.6167,"radius_km":20.0,"ua_fingerprint":"Firefox/133/Linux/desktop"}}"#,
                                i % 5_000,
                                i % 250,
                                i / 250
                            ),
                        }
                    })
                    .collect::<Arc<[_]>>()
            },
            |batch| rt.block_on(store.insert_events(batch)).unwrap(),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(engine, benches, decision, replay_events, audit_batches);
criterion_main!(engine);
