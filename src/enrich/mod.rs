//! Enrichment of a request's client: GeoIP (city, coordinates, accuracy radius),
//! ASN, network prefix and user-agent fingerprint. Lookups are cached; GeoIP
//! databases are memory-mapped and swapped atomically when their files change.
//! Everything here is a pure lookup: no clock, no database.

mod geoip;
mod useragent;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use geoip::{DbLayout, DbStatus, GeoIp, GeoResult, GeoStatus};
pub use useragent::{DeviceClass, UaFingerprint, UaParser};

/// Where the databases are and how to treat what they lack.
#[derive(Debug, Clone)]
pub struct EnrichConfig {
    pub geoip_city: Option<PathBuf>,
    pub geoip_asn: Option<PathBuf>,
    /// Radius to assume when a database gives coordinates without one (DB-IP Lite layout).
    pub default_radius_km: f64,
    /// Prefix lengths that define "the same network".
    pub prefix_v4: u8,
    pub prefix_v6: u8,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            geoip_city: None,
            geoip_asn: None,
            default_radius_km: 50.0,
            prefix_v4: 24,
            prefix_v6: 48,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("cannot open GeoIP database {path}: {message}")]
    GeoIp { path: PathBuf, message: String },
    #[error("cannot load the user-agent regexes: {0}")]
    UserAgent(String),
}

/// Where an address is, as far as the city database knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// ISO 3166-1 alpha-2, e.g. `NO`.
    pub country: Option<Arc<str>>,
    /// English city name, e.g. `Oslo`.
    pub city: Option<Arc<str>>,
    pub latitude: f64,
    pub longitude: f64,
    /// How far off the coordinates may be, in kilometres.
    pub radius_km: f64,
}

/// Everything we know about the client of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// IPv4-mapped IPv6 folded to IPv4.
    pub ip: IpAddr,
    /// The network (/24 or /48 by default) the address belongs to.
    pub prefix: IpNet,
    /// Country code even when the database has no coordinates.
    pub country: Option<Arc<str>>,
    pub location: Option<Location>,
    pub asn: Option<u32>,
    pub asn_org: Option<Arc<str>>,
    /// Shared with every client that sent the same `User-Agent`.
    pub ua: Arc<UaFingerprint>,
}

impl ClientInfo {
    /// One canonical line for the binding digest: every field the binding rules use.
    pub fn binding_text(&self) -> String {
        let loc = self.location.as_ref().map_or_else(String::new, |l| {
            format!("{:.4},{:.4},{:.0}", l.latitude, l.longitude, l.radius_km)
        });
        format!(
            "ip={}|net={}|asn={}|cc={}|loc={}|ua={}",
            self.ip,
            self.prefix,
            self.asn.map_or_else(String::new, |a| a.to_string()),
            self.country.as_deref().unwrap_or(""),
            loc,
            self.ua.key()
        )
    }
}

/// The enrichment service: GeoIP readers and caches, shared by all requests.
pub struct Enricher {
    config: EnrichConfig,
    geoip: GeoIp,
    ua: Arc<UaParser>,
}

impl Enricher {
    /// Opens the configured databases. No GeoIP configured is not an error: geo rules go inactive.
    pub fn new(config: EnrichConfig, ua: Arc<UaParser>) -> Result<Self, EnrichError> {
        let geoip = GeoIp::open(&config)?;
        Ok(Self { config, geoip, ua })
    }

    pub fn enrich(&self, ip: IpAddr, user_agent: &str) -> ClientInfo {
        self.client(ip, self.geoip.lookup(ip), self.ua.fingerprint(user_agent))
    }

    /// A client from its parts: the address's GeoIP answer and the fingerprint.
    pub fn client(&self, ip: IpAddr, geo: GeoResult, ua: Arc<UaFingerprint>) -> ClientInfo {
        let ip = ip.to_canonical();
        ClientInfo {
            ip,
            prefix: network_prefix(ip, self.config.prefix_v4, self.config.prefix_v6),
            country: geo.country,
            location: geo.location,
            asn: geo.asn,
            asn_org: geo.asn_org,
            ua,
        }
    }

    /// The user-agent fingerprint alone (cached).
    pub fn ua_fingerprint(&self, user_agent: &str) -> Arc<UaFingerprint> {
        self.ua.fingerprint(user_agent)
    }

    pub fn geoip(&self) -> &GeoIp {
        &self.geoip
    }
}

/// The network an address belongs to, at the configured prefix length.
pub fn network_prefix(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    let ip = ip.to_canonical();
    let len = if ip.is_ipv4() {
        v4.min(32)
    } else {
        v6.min(128)
    };
    IpNet::new(ip, len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}
