//! Micro-benchmarks of the verification path: a bare HS512 token decode beside
//! one full risk evaluation (default rules, enrichment cached) and enrichment
//! alone. Run with `cargo bench --bench engine`; compare the figures side by side.

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
            let client = enricher.enrich(black_box(ip), black_box(UA));
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

criterion_group!(engine, benches);
criterion_main!(engine);
