//! `new_location`: a country or ASN never seen for this user (the history is
//! bounded and kept by the caller). A user with no history yet never fires.

use super::hit;
use crate::risk::rules::{LocationKind, NewLocation};
use crate::risk::{Hit, RequestContext, SessionView};

pub fn evaluate(p: &NewLocation, ctx: &RequestContext<'_>, view: &SessionView<'_>) -> Option<Hit> {
    match p.what {
        LocationKind::Country => {
            let c = ctx.client.country.as_ref()?;
            (!view.known_countries.is_empty() && !view.known_countries.contains(c))
                .then(|| hit(ctx, format!("first request from country {c} for this user")))
        }
        LocationKind::Asn => {
            let a = ctx.client.asn?;
            (!view.known_asns.is_empty() && !view.known_asns.contains(&a))
                .then(|| hit(ctx, format!("first request from AS{a} for this user")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::detectors::fixtures::*;

    #[test]
    fn fires_for_an_unseen_country_only_once_there_is_history() {
        let (o, l) = (oslo(), lagos());
        let p = NewLocation {
            what: LocationKind::Country,
        };
        let known = [std::sync::Arc::from("NO")];
        let mut v = view(&o, None);
        assert!(evaluate(&p, &ctx(&l, 0), &v).is_none(), "no history yet");
        v.known_countries = &known;
        assert!(evaluate(&p, &ctx(&o, 0), &v).is_none());
        assert!(evaluate(&p, &ctx(&l, 0), &v).is_some());
        let asns = [2119];
        v.known_asns = &asns;
        assert!(
            evaluate(
                &NewLocation {
                    what: LocationKind::Asn
                },
                &ctx(&l, 0),
                &v
            )
            .is_some()
        );
    }
}
