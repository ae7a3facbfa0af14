//! `ip_binding`: the request comes from elsewhere than the session's binding, at
//! the chosen tier (exact address, network prefix, ASN or country). A tier the
//! GeoIP databases cannot answer for never fires.

use super::hit;
use crate::risk::rules::{IpBinding, Tier};
use crate::risk::{Hit, RequestContext, SessionView};

pub fn evaluate(p: &IpBinding, ctx: &RequestContext<'_>, view: &SessionView<'_>) -> Option<Hit> {
    let bound = view.binding?;
    let now = ctx.client;
    let detail = match p.tier {
        Tier::Exact => {
            (bound.ip != now.ip).then(|| format!("IP {} differs from bound {}", now.ip, bound.ip))
        }
        Tier::Prefix => (bound.prefix != now.prefix)
            .then(|| format!("network {} differs from bound {}", now.prefix, bound.prefix)),
        Tier::Asn => match (bound.asn, now.asn) {
            (Some(b), Some(n)) if b != n => Some(format!("AS{n} differs from bound AS{b}")),
            _ => None,
        },
        Tier::Country => match (&bound.country, &now.country) {
            (Some(b), Some(n)) if b != n => Some(format!("country {n} differs from bound {b}")),
            _ => None,
        },
    }?;
    Some(hit(ctx, detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::detectors::fixtures::*;

    #[test]
    fn each_tier_fires_only_on_its_own_kind_of_change() {
        let home = oslo();
        let mut same_net = oslo();
        std::sync::Arc::make_mut(&mut same_net).ip = "198.51.100.77".parse().unwrap();
        let abroad = lagos();
        let tiers = [Tier::Exact, Tier::Prefix, Tier::Asn, Tier::Country];
        let fires = |t: Tier, now: &std::sync::Arc<crate::enrich::ClientInfo>| {
            evaluate(&IpBinding { tier: t }, &ctx(now, 0), &view(&home, None)).is_some()
        };
        assert_eq!(tiers.map(|t| fires(t, &home)), [false; 4]);
        assert_eq!(
            tiers.map(|t| fires(t, &same_net)),
            [true, false, false, false]
        );
        assert_eq!(tiers.map(|t| fires(t, &abroad)), [true; 4]);
        let mut unknown = lagos();
        std::sync::Arc::make_mut(&mut unknown).country = None;
        std::sync::Arc::make_mut(&mut unknown).asn = None;
        assert_eq!(
            tiers.map(|t| fires(t, &unknown)),
            [true, true, false, false]
        );
    }
}
