//! `network_list`: the client's IP is in one of the listed CIDRs, or its ASN is
//! listed. With points or an action it is a deny-list (anonymizers, hosting);
//! with `suppress` it is an allow-list whose members are spared the named rules.

use super::hit;
use crate::risk::rules::NetworkList;
use crate::risk::{Hit, RequestContext};

pub fn evaluate(p: &NetworkList, ctx: &RequestContext<'_>) -> Option<Hit> {
    let ip = ctx.client.ip;
    if let Some(net) = p.cidrs.iter().find(|n| n.contains(&ip)) {
        return Some(hit(ctx, format!("{ip} is in listed network {net}")));
    }
    let asn = ctx.client.asn?;
    p.asns
        .contains(&asn)
        .then(|| hit(ctx, format!("AS{asn} is a listed network")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::detectors::fixtures::*;

    #[test]
    fn matches_by_cidr_or_asn() {
        let c = oslo();
        let by_cidr = NetworkList {
            cidrs: vec!["198.51.100.0/24".parse().unwrap()],
            asns: vec![],
            suppress: vec![],
        };
        assert!(evaluate(&by_cidr, &ctx(&c, 0)).is_some());
        assert!(evaluate(&by_cidr, &ctx(&lagos(), 0)).is_none());
        let by_asn = NetworkList {
            cidrs: vec![],
            asns: vec![29465],
            suppress: vec![],
        };
        assert!(evaluate(&by_asn, &ctx(&lagos(), 0)).is_some());
    }
}
