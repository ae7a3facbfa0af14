//! User-facing message templates: `{name}` placeholders filled from what a
//! detector saw. Unknown placeholders are refused when the rule file loads.

use std::collections::BTreeMap;

/// Every placeholder a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "city",
    "country",
    "prev_city",
    "prev_country",
    "minutes",
    "distance_km",
    "speed_kmh",
    "ip",
    "asn",
    "browser",
    "os",
    "retry_after",
];

/// The placeholders a template uses that we do not know, in order.
pub fn unknown_placeholders(template: &str) -> Vec<String> {
    placeholders(template)
        .filter(|p| !PLACEHOLDERS.contains(p))
        .map(str::to_owned)
        .collect()
}

fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template
        .split('{')
        .skip(1)
        .filter_map(|s| s.split_once('}').map(|(name, _)| name))
}

/// Fills the placeholders; a value the detector did not provide reads "unknown".
pub fn render(template: &str, vars: &BTreeMap<&'static str, String>) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.split_once('}') {
            Some((name, tail)) if PLACEHOLDERS.contains(&name) => {
                out.push_str(vars.get(name).map_or("unknown", String::as_str));
                rest = tail;
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_known_placeholders_and_name_unknown_ones() {
        let vars = BTreeMap::from([("city", "Lagos".to_owned()), ("country", "NG".to_owned())]);
        assert_eq!(
            render("From {city}, {country} after {prev_city}.", &vars),
            "From Lagos, NG after unknown."
        );
        assert_eq!(render("literal { brace", &vars), "literal { brace");
        assert_eq!(unknown_placeholders("{city} {town}"), ["town"]);
    }
}
