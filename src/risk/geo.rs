//! Great-circle distance and the impossible-travel arithmetic.

/// Mean Earth radius (IUGG), kilometres.
const EARTH_RADIUS_KM: f64 = 6371.0088;

/// Haversine distance between two points given in degrees, in kilometres.
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn london_to_linkoping_is_about_1300_km() {
        let d = haversine_km(51.5142, -0.0931, 58.4167, 15.6167);
        assert!((1200.0..1400.0).contains(&d), "{d}");
        assert!(haversine_km(10.0, 10.0, 10.0, 10.0).abs() < 1e-9);
    }
}
