//! `geo_velocity`: impossible travel. The distance between the previous and the
//! current location, minus both accuracy radii, over the elapsed time (never less
//! than `min_elapsed`), above `max_speed_kmh` — when the distance is at least
//! `min_distance_km`. Compares with this session's previous request, or with the
//! user's previous request in any session (`scope = "user"`).

use super::hit;
use crate::enrich::Location;
use crate::risk::geo::haversine_km;
use crate::risk::rules::{GeoVelocity, Scope};
use crate::risk::{Hit, Observation, RequestContext, SessionView};

/// Distance (km, after radii), elapsed seconds (after the floor) and speed (km/h).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Travel {
    pub distance_km: f64,
    pub elapsed_secs: f64,
    pub speed_kmh: f64,
}

pub fn travel(p: &GeoVelocity, from: &Location, from_ms: i64, to: &Location, to_ms: i64) -> Travel {
    let raw = haversine_km(from.latitude, from.longitude, to.latitude, to.longitude);
    let slack = if p.use_accuracy_radius {
        from.radius_km.max(0.0) + to.radius_km.max(0.0)
    } else {
        0.0
    };
    let distance_km = (raw - slack).max(0.0);
    let elapsed_secs = (((to_ms - from_ms) as f64) / 1000.0).max(p.min_elapsed_secs);
    Travel {
        distance_km,
        elapsed_secs,
        speed_kmh: distance_km / (elapsed_secs / 3600.0),
    }
}

pub fn evaluate(p: &GeoVelocity, ctx: &RequestContext<'_>, view: &SessionView<'_>) -> Option<Hit> {
    let prev: &Observation = match p.scope {
        Scope::Session => view.last?,
        Scope::User => view.user_last?,
    };
    let from = prev.client.location.as_ref()?;
    let to = ctx.client.location.as_ref()?;
    let t = travel(p, from, prev.at_ms, to, ctx.at_ms);
    if t.distance_km < p.min_distance_km || t.speed_kmh <= p.max_speed_kmh {
        return None;
    }
    let minutes = ((ctx.at_ms - prev.at_ms).max(0) / 60_000).to_string();
    let place = |l: &Location| {
        format!(
            "{}, {}",
            l.city.as_deref().unwrap_or("unknown city"),
            l.country.as_deref().unwrap_or("??")
        )
    };
    let mut h = hit(
        ctx,
        format!(
            "{:.0} km from {} to {} in {} min: {:.0} km/h (limit {:.0})",
            t.distance_km,
            place(from),
            place(to),
            minutes,
            t.speed_kmh,
            p.max_speed_kmh
        ),
    );
    if let Some(c) = &from.city {
        h.vars.insert("prev_city", c.to_string());
    }
    if let Some(c) = prev.client.country.as_ref().or(from.country.as_ref()) {
        h.vars.insert("prev_country", c.to_string());
    }
    h.vars.insert("minutes", minutes);
    h.vars
        .insert("distance_km", format!("{:.0}", t.distance_km));
    h.vars.insert("speed_kmh", format!("{:.0}", t.speed_kmh));
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::detectors::fixtures::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn params(radius: bool) -> GeoVelocity {
        GeoVelocity {
            max_speed_kmh: 900.0,
            min_distance_km: 100.0,
            min_elapsed_secs: 60.0,
            scope: Scope::Session,
            use_accuracy_radius: radius,
        }
    }

    #[test]
    fn oslo_to_lagos_in_ten_minutes_is_impossible_and_in_a_day_is_not() {
        let (o, l) = (oslo(), lagos());
        let prev = Observation {
            at_ms: 0,
            client: o.clone(),
        };
        let h = evaluate(&params(true), &ctx(&l, 10 * 60_000), &view(&o, Some(&prev))).unwrap();
        assert_eq!(h.vars["prev_city"], "Oslo");
        assert_eq!(h.vars["minutes"], "10");
        assert!(
            evaluate(
                &params(true),
                &ctx(&l, 24 * 3_600_000),
                &view(&o, Some(&prev))
            )
            .is_none()
        );
    }

    #[test]
    fn accuracy_radii_can_explain_a_short_hop() {
        // Two fixes 150 km apart with 80 km radii each: no real evidence of travel.
        let a = client("192.0.2.1", "SE", "A", 59.0, 15.0, 1);
        let mut b = client("192.0.2.2", "SE", "B", 59.0, 17.63, 1);
        let prev = Observation {
            at_ms: 0,
            client: a.clone(),
        };
        let mut a2 = a.clone();
        if let Some(l) = Arc::make_mut(&mut a2).location.as_mut() {
            l.radius_km = 80.0;
        }
        if let Some(l) = Arc::make_mut(&mut b).location.as_mut() {
            l.radius_km = 80.0;
        }
        let prev_wide = Observation {
            at_ms: 0,
            client: a2.clone(),
        };
        assert!(
            evaluate(
                &params(true),
                &ctx(&b, 60_000),
                &view(&a2, Some(&prev_wide))
            )
            .is_none()
        );
        assert!(evaluate(&params(false), &ctx(&b, 60_000), &view(&a, Some(&prev))).is_some());
    }

    #[test]
    fn without_coordinates_nothing_fires() {
        let (o, mut l) = (oslo(), lagos());
        Arc::make_mut(&mut l).location = None;
        let prev = Observation {
            at_ms: 0,
            client: o.clone(),
        };
        assert!(evaluate(&params(true), &ctx(&l, 60_000), &view(&o, Some(&prev))).is_none());
    }

    proptest! {
        #[test]
        fn firing_never_stops_as_distance_grows_for_a_fixed_gap(
            lat in -60.0f64..60.0, lon in -170.0f64..170.0, d1 in 0.0f64..40.0, extra in 0.0f64..40.0,
            gap_ms in 0i64..86_400_000, radius in 0.0f64..200.0,
        ) {
            let p = params(true);
            let mk = |dlon: f64| Location { country: None, city: None, latitude: lat, longitude: lon + dlon, radius_km: radius };
            let t1 = travel(&p, &mk(0.0), 0, &mk(d1), gap_ms);
            let t2 = travel(&p, &mk(0.0), 0, &mk(d1 + extra), gap_ms);
            // Longitude steps below 180° only move the point further along the parallel.
            prop_assume!(d1 + extra < 180.0);
            prop_assert!(t2.distance_km + 1e-6 >= t1.distance_km);
            prop_assert!(t2.speed_kmh + 1e-6 >= t1.speed_kmh);
            let fires = |t: Travel| t.distance_km >= p.min_distance_km && t.speed_kmh > p.max_speed_kmh;
            prop_assert!(!fires(t1) || fires(t2));
        }
    }
}
