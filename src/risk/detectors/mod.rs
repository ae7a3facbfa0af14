//! One file per detector; [`run`] dispatches a rule to its detector.

mod concurrent_use;
mod geo_velocity;
mod ip_binding;
mod network_list;
mod new_location;
mod rate;
mod referrer;
mod refresh_reuse;
mod ua_binding;

use super::rate::SessionQuotas;
use super::rules::{Detector, Rule};
use super::{Hit, RateLimiters, RequestContext, SessionView};

pub use geo_velocity::travel;

/// Runs the rule's detector; `Some` when it fires. `quotas` are the session's own
/// (its `sid` rate quotas).
pub fn run(
    rule: &Rule,
    limiters: &RateLimiters,
    ctx: &RequestContext<'_>,
    view: &SessionView<'_>,
    quotas: &mut SessionQuotas,
) -> Option<Hit> {
    match &rule.detector {
        Detector::IpBinding(p) => ip_binding::evaluate(p, ctx, view),
        Detector::UaBinding(p) => ua_binding::evaluate(p, ctx, view),
        Detector::GeoVelocity(p) => geo_velocity::evaluate(p, ctx, view),
        Detector::NewLocation(p) => new_location::evaluate(p, ctx, view),
        Detector::Rate(p) => rate::evaluate(&rule.id, p, limiters, ctx, quotas),
        Detector::Referrer(p) => referrer::evaluate(p, ctx),
        Detector::ConcurrentUse(p) => concurrent_use::evaluate(p, ctx, view),
        Detector::RefreshReuse(p) => refresh_reuse::evaluate(p, ctx),
        Detector::NetworkList(p) => network_list::evaluate(p, ctx),
    }
}

fn hit(_ctx: &RequestContext<'_>, detail: String) -> Hit {
    Hit {
        detail,
        ..Hit::default()
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Clients and contexts for detector tests.
    use std::net::IpAddr;
    use std::sync::Arc;

    use crate::enrich::{ClientInfo, DeviceClass, Location, UaFingerprint, network_prefix};
    use crate::risk::{Observation, RequestContext, RequestKind, SessionView};

    pub fn client(
        ip: &str,
        country: &str,
        city: &str,
        lat: f64,
        lon: f64,
        asn: u32,
    ) -> Arc<ClientInfo> {
        let ip: IpAddr = ip.parse().unwrap();
        Arc::new(ClientInfo {
            ip,
            prefix: network_prefix(ip, 24, 48),
            country: Some(country.into()),
            location: Some(Location {
                country: Some(country.into()),
                city: Some(city.into()),
                latitude: lat,
                longitude: lon,
                radius_km: 10.0,
            }),
            asn: Some(asn),
            asn_org: None,
            ua: std::sync::Arc::new(UaFingerprint::new(
                "Firefox".into(),
                Some("133".into()),
                "Linux".into(),
                DeviceClass::Desktop,
            )),
        })
    }

    pub fn oslo() -> Arc<ClientInfo> {
        client("198.51.100.10", "NO", "Oslo", 59.9139, 10.7522, 2119)
    }

    pub fn lagos() -> Arc<ClientInfo> {
        client("203.0.113.50", "NG", "Lagos", 6.5244, 3.3792, 29465)
    }

    pub fn ctx<'a>(client: &'a Arc<ClientInfo>, at_ms: i64) -> RequestContext<'a> {
        RequestContext {
            kind: RequestKind::Request,
            at_ms,
            client,
            method: Some("GET"),
            path: Some("/api/items"),
            referrer: None,
            origin: None,
            sec_fetch_site: None,
            cost: 1,
            jti: "j",
            sid: "s",
            sub: "alice",
            refresh_reused: false,
        }
    }

    pub fn view<'a>(binding: &'a ClientInfo, last: Option<&'a Observation>) -> SessionView<'a> {
        SessionView {
            binding: Some(binding),
            last,
            user_last: last,
            recent: &[],
            known_countries: &[],
            known_asns: &[],
            risk: 0.0,
            risk_at_ms: 0,
            step_up: false,
            step_up_message: None,
        }
    }
}
