//! The integration test binary: the real server on loopback ports, real SQLite
//! files and a real PostgreSQL, and a real JWT library from another language.

mod api;
mod browser;
mod cluster;
mod enrich;
mod events;
mod forward_auth;
mod gateway;
mod interop;
mod issuers;
mod metrics;
mod nodes;
mod replay;
mod risk;
mod store;
mod support;
mod tokens;
