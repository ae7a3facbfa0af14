//! tokenwarden: a session monitor for JWT-authenticated apps.
//!
//! Data flows one way: HTTP (thin) → domain (token, session, revocation) → store.
//! See `ARCHITECTURE.md` for the bird's-eye view and the invariants.

/// The command line: `serve`, `migrate`, `keys generate`.
pub mod cli;
/// The one source of time, injected everywhere (a manual clock in tests).
pub mod clock;
/// Typed, validated configuration: TOML file plus `TOKENWARDEN_*` overrides.
pub mod config;
/// Request enrichment: GeoIP location and ASN, network prefix, user-agent fingerprint.
pub mod enrich;
/// Audit events: one per decision, queued and written in batches off the request path.
pub mod events;
/// The change feed that keeps several nodes' in-memory views in step (PostgreSQL).
pub mod feed;
/// The HTTP layer: routers, extractors, the error type and the application runner.
pub mod http;
/// Prometheus metrics with bounded labels, rendered on the admin listener.
pub mod metrics;
/// The live risk engine: active rules, enrichment, rate limiters, session and user state.
pub mod monitor;
/// Replay of recorded events under candidate rules, with a diff against a baseline.
pub mod replay;
/// In-memory revocation state read by every verification (no database on the hot path).
pub mod revocation;
/// The risk engine: rule files, detectors, scoring (a pure function) and per-session state.
pub mod risk;
/// Sessions: open, refresh rotation with reuse detection, reauth, logout, verify.
pub mod session;
/// Durable state: the `Store` trait and its SQLite and PostgreSQL implementations.
pub mod store;
/// Access tokens: keys, JWKS, minting and verification (the only user of jsonwebtoken).
pub mod token;

/// The concurrent map of the in-memory state every verification reads. ahash is seeded
/// at random per process (its keys come partly from clients: subjects, `jti`s,
/// addresses), which resists hash flooding, with weaker guarantees than SipHash and
/// at a fraction of its cost.
pub(crate) type ConcurrentMap<K, V> = dashmap::DashMap<K, V, ahash::RandomState>;
