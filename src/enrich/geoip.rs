//! GeoIP and ASN lookups: the memory-mapped city and ASN readers, their atomic
//! hot swap when the files are replaced, the per-address result cache, and the
//! status report for `/readyz`.
//!
//! Two record layouts are understood, detected when a file is opened:
//! MaxMind GeoIP2/GeoLite2 (nested `country.iso_code`, `location.latitude`, ...)
//! and the flat DB-IP Lite / ip-location-db layout (`country_code`, `latitude`
//! as float32, no accuracy radius).

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use maxminddb::{LookupResult, Mmap, Reader, WithinOptions, geoip2};
use quick_cache::sync::Cache;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::{Deserialize, Serialize};

use super::{EnrichConfig, EnrichError, Location};

/// Distinct addresses remembered; a lookup result is a few dozen bytes.
const CACHE_CAPACITY: usize = 100_000;
/// Records inspected when the metadata does not say which layout a file uses.
const PROBE_RECORDS: usize = 32;

/// What the databases say about one address. Empty when GeoIP is inactive or
/// the address is unknown.
#[derive(Clone, Debug, Default)]
pub struct GeoResult {
    /// ISO 3166-1 alpha-2 code, present even when there are no coordinates.
    pub country: Option<Arc<str>>,
    pub location: Option<Location>,
    pub asn: Option<u32>,
    pub asn_org: Option<Arc<str>>,
}

/// How the records of a database are shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbLayout {
    /// MaxMind GeoIP2 / GeoLite2: nested maps, double coordinates, accuracy radius.
    Geoip2,
    /// DB-IP Lite / ip-location-db: flat keys, float coordinates, no radius.
    Flat,
}

impl fmt::Display for DbLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Geoip2 => "GeoIP2",
            Self::Flat => "flat DB-IP",
        })
    }
}

/// One database as reported by `/readyz`.
#[derive(Clone, Debug, Serialize)]
pub struct DbStatus {
    /// A path was configured.
    pub configured: bool,
    /// A reader is open and answering lookups.
    pub active: bool,
    pub path: Option<PathBuf>,
    /// `database_type` from the file's metadata, e.g. `GeoIP2-City`.
    pub database_type: Option<String>,
    /// Build time from the metadata, seconds since the Unix epoch.
    pub build_epoch: Option<u64>,
    pub layout: Option<DbLayout>,
    /// 4 or 6; an IPv4-only file answers nothing for IPv6 clients.
    pub ip_version: Option<u16>,
    /// Why the last reload of this file failed (the previous reader stays in use).
    pub last_error: Option<String>,
}

/// The GeoIP part of `/readyz`.
#[derive(Clone, Debug, Serialize)]
pub struct GeoStatus {
    /// A city database is answering, so location rules can fire.
    pub active: bool,
    pub city: DbStatus,
    pub asn: DbStatus,
    /// One line for operators, e.g. why geo rules do not fire.
    pub summary: String,
}

/// Identity of a file on disk, to notice when it has been replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        Ok(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            dev,
            ino,
        })
    }
}

/// An open database file.
struct Db {
    reader: Reader<Mmap>,
    path: PathBuf,
    stamp: FileStamp,
    layout: DbLayout,
}

impl Db {
    fn open(path: &Path) -> Result<Self, EnrichError> {
        let error = |message: String| EnrichError::GeoIp {
            path: path.to_path_buf(),
            message,
        };
        let stamp = FileStamp::of(path).map_err(|e| error(e.to_string()))?;
        // SAFETY: `open_mmap` requires that the file is not modified or truncated
        // while mapped. Database updates are deployed by writing a new file and
        // renaming it over the old path (the documented procedure, and what
        // geoipupdate, ConfigMaps and our reload do): the mapped inode itself is
        // never written, and it stays alive until the last reader is dropped.
        let reader = unsafe { Reader::open_mmap(path) }.map_err(|e| error(e.to_string()))?;
        let layout = detect_layout(&reader);
        Ok(Self {
            reader,
            path: path.to_path_buf(),
            stamp,
            layout,
        })
    }

    /// Looks `ip` up, treating every failure as "not found".
    fn find(&self, ip: IpAddr) -> Option<LookupResult<'_, Mmap>> {
        // An IPv4-only file cannot answer for IPv6; that is expected, not an error.
        if ip.is_ipv6() && self.reader.metadata().ip_version == 4 {
            return None;
        }
        match self.reader.lookup(ip) {
            Ok(found) if found.has_data() => Some(found),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%ip, path = %self.path.display(), error = %e, "GeoIP lookup failed");
                None
            }
        }
    }

    fn status(&self) -> DbStatus {
        let meta = self.reader.metadata();
        DbStatus {
            configured: true,
            active: true,
            path: Some(self.path.clone()),
            database_type: Some(meta.database_type.clone()),
            build_epoch: Some(meta.build_epoch),
            layout: Some(self.layout),
            ip_version: Some(meta.ip_version),
            last_error: None,
        }
    }
}

/// Picks the record layout: by `database_type` when it names a MaxMind
/// product, otherwise by looking at the keys of the first records.
fn detect_layout(reader: &Reader<Mmap>) -> DbLayout {
    let kind = reader.metadata().database_type.to_ascii_lowercase();
    if kind.starts_with("geoip2-") || kind.starts_with("geolite2-") || kind.starts_with("geoip-") {
        return DbLayout::Geoip2;
    }
    if let Some(layout) = probe_layout(reader) {
        return layout;
    }
    if kind.contains("dbip") || kind.contains("db-ip") || kind.contains("ip-location-db") {
        DbLayout::Flat
    } else {
        DbLayout::Geoip2
    }
}

/// The top-level keys that tell the layouts apart.
#[derive(Deserialize)]
struct LayoutProbe {
    #[serde(default)]
    country: Option<IgnoredAny>,
    #[serde(default)]
    location: Option<IgnoredAny>,
    #[serde(default)]
    country_code: Option<IgnoredAny>,
    #[serde(default)]
    latitude: Option<IgnoredAny>,
}

fn probe_layout(reader: &Reader<Mmap>) -> Option<DbLayout> {
    let networks = reader.networks(WithinOptions::default()).ok()?;
    for item in networks.take(PROBE_RECORDS) {
        let Ok(Some(probe)) = item.and_then(|found| found.decode::<LayoutProbe>()) else {
            continue;
        };
        if probe.country_code.is_some() || probe.latitude.is_some() {
            return Some(DbLayout::Flat);
        }
        if probe.country.is_some() || probe.location.is_some() {
            return Some(DbLayout::Geoip2);
        }
    }
    None
}

/// A DB-IP Lite / ip-location-db city record. Coordinates are float32 there,
/// which `f64` fields reject, so they are read leniently.
#[derive(Deserialize)]
struct FlatCity {
    #[serde(default)]
    country_code: Option<String>,
    #[serde(default)]
    city: Option<String>,
    #[serde(default, deserialize_with = "lenient_f64")]
    latitude: Option<f64>,
    #[serde(default, deserialize_with = "lenient_f64")]
    longitude: Option<f64>,
}

/// An ASN record; the number is read leniently because writers differ on its width.
#[derive(Deserialize)]
struct FlatAsn {
    #[serde(default, deserialize_with = "lenient_u32")]
    autonomous_system_number: Option<u32>,
    #[serde(default)]
    autonomous_system_organization: Option<String>,
}

/// Accepts float, double or integer values (the reader's typed `f64` accepts only double).
fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    struct Number;
    impl Visitor<'_> for Number {
        type Value = Option<f64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number")
        }
        fn visit_f32<E: de::Error>(self, v: f32) -> Result<Self::Value, E> {
            // Via the shortest decimal form so 51.5142f32 reads as 51.5142, not 51.51419830.
            Ok(v.to_string().parse().ok().or(Some(f64::from(v))))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
    }
    d.deserialize_any(Number)
}

/// Accepts any unsigned or signed integer that fits in a `u32`.
fn lenient_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct Number;
    impl Visitor<'_> for Number {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an AS number")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u32::try_from(v).ok())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(u32::try_from(v).ok())
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
            Ok(u32::try_from(v).ok())
        }
    }
    d.deserialize_any(Number)
}

/// Coordinates usable for distance arithmetic.
fn valid_coordinates(lat: Option<f64>, lon: Option<f64>) -> Option<(f64, f64)> {
    let (lat, lon) = (lat?, lon?);
    let ok = lat.is_finite() && lon.is_finite() && lat.abs() <= 90.0 && lon.abs() <= 180.0;
    ok.then_some((lat, lon))
}

/// Which database a slot holds, for messages.
#[derive(Clone, Copy)]
enum Kind {
    City,
    Asn,
}

/// The GeoIP service: both readers, swappable at run time, and a lookup cache.
pub struct GeoIp {
    city_path: Option<PathBuf>,
    asn_path: Option<PathBuf>,
    default_radius_km: f64,
    city: ArcSwapOption<Db>,
    asn: ArcSwapOption<Db>,
    /// Bumped on every swap; cached results from an older generation are ignored,
    /// so a lookup racing a swap cannot leave a stale answer behind.
    generation: AtomicU64,
    cache: Cache<IpAddr, (u64, GeoResult)>,
    /// Last reload failure per database, kept for `/readyz`.
    errors: Mutex<(Option<String>, Option<String>)>,
    /// Country, city and organisation names, one copy each, shared by every result
    /// (and so by every session) that names them.
    names: Mutex<HashSet<Arc<str>>>,
    /// Serialises reloads so two watchers cannot interleave their swaps.
    reload_lock: Mutex<()>,
}

impl fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoIp")
            .field("city_path", &self.city_path)
            .field("asn_path", &self.asn_path)
            .finish_non_exhaustive()
    }
}

impl GeoIp {
    /// Opens the configured databases. A path that is not configured leaves that
    /// database inactive; a configured file that cannot be opened is an error.
    pub fn open(config: &EnrichConfig) -> Result<GeoIp, EnrichError> {
        let city = config.geoip_city.as_deref().map(Db::open).transpose()?;
        let asn = config.geoip_asn.as_deref().map(Db::open).transpose()?;
        for db in city.iter().chain(asn.iter()) {
            let meta = db.reader.metadata();
            tracing::info!(
                path = %db.path.display(),
                database_type = %meta.database_type,
                build_epoch = meta.build_epoch,
                layout = %db.layout,
                "GeoIP database opened"
            );
        }
        let default_radius_km = if config.default_radius_km.is_finite() {
            config.default_radius_km.max(0.0)
        } else {
            EnrichConfig::default().default_radius_km
        };
        Ok(GeoIp {
            city_path: config.geoip_city.clone(),
            asn_path: config.geoip_asn.clone(),
            default_radius_km,
            city: ArcSwapOption::new(city.map(Arc::new)),
            asn: ArcSwapOption::new(asn.map(Arc::new)),
            // Never 0: a session's state keeps it as a `NonZeroU64`.
            generation: AtomicU64::new(1),
            cache: Cache::new(CACHE_CAPACITY),
            errors: Mutex::new((None, None)),
            names: Mutex::new(HashSet::new()),
            reload_lock: Mutex::new(()),
        })
    }

    /// Bumped whenever a database is swapped: an answer from an older generation
    /// may be stale. Starts at 1.
    pub fn generation(&self) -> NonZeroU64 {
        NonZeroU64::new(self.generation.load(Ordering::Acquire)).unwrap_or(NonZeroU64::MIN)
    }

    /// What the databases know about `ip`. Never fails: unknown addresses,
    /// inactive databases and decoding errors all give an empty result.
    pub fn lookup(&self, ip: IpAddr) -> GeoResult {
        // IPv4-mapped IPv6 is the same client; fold it so both forms share a cache entry
        // and so IPv4-only files can answer it.
        let ip = ip.to_canonical();
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((cached_generation, result)) = self.cache.get(&ip)
            && cached_generation == generation
        {
            return result;
        }
        let city = self.city.load_full();
        let asn = self.asn.load_full();
        if city.is_none() && asn.is_none() {
            return GeoResult::default();
        }
        let mut result = GeoResult::default();
        if let Some(db) = city.as_deref() {
            self.lookup_city(db, ip, &mut result);
        }
        if let Some(db) = asn.as_deref()
            && let Some((asn, org)) = lookup_asn(db, ip)
        {
            result.asn = asn;
            result.asn_org = org.map(|o| self.intern(o));
        }
        self.cache.insert(ip, (generation, result.clone()));
        result
    }

    /// The one shared copy of a name. The set only grows with the names the
    /// databases hold; it is emptied if it ever passes `MAX_NAMES`, which only
    /// costs sharing, never correctness.
    fn intern(&self, name: String) -> Arc<str> {
        const MAX_NAMES: usize = 500_000;
        let Ok(mut names) = self.names.lock() else {
            return Arc::from(name);
        };
        if let Some(known) = names.get(name.as_str()) {
            return Arc::clone(known);
        }
        if names.len() >= MAX_NAMES {
            names.clear();
        }
        let shared: Arc<str> = Arc::from(name);
        names.insert(Arc::clone(&shared));
        shared
    }

    fn lookup_city(&self, db: &Db, ip: IpAddr, out: &mut GeoResult) {
        let Some(found) = db.find(ip) else { return };
        let (country, city, coordinates, radius) = match db.layout {
            DbLayout::Geoip2 => match found.decode::<geoip2::City>() {
                Ok(Some(rec)) => (
                    rec.country.iso_code.map(str::to_owned),
                    rec.city.names.english.map(str::to_owned),
                    valid_coordinates(rec.location.latitude, rec.location.longitude),
                    rec.location.accuracy_radius.map(f64::from),
                ),
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(%ip, path = %db.path.display(), error = %e, "GeoIP city record not decodable");
                    return;
                }
            },
            DbLayout::Flat => match found.decode::<FlatCity>() {
                Ok(Some(rec)) => (
                    rec.country_code,
                    rec.city,
                    valid_coordinates(rec.latitude, rec.longitude),
                    None,
                ),
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(%ip, path = %db.path.display(), error = %e, "GeoIP city record not decodable");
                    return;
                }
            },
        };
        // Empty strings appear in some exports; treat them as absent.
        let country = country.filter(|c| !c.is_empty()).map(|c| self.intern(c));
        let city = city.filter(|c| !c.is_empty()).map(|c| self.intern(c));
        out.location = coordinates.map(|(latitude, longitude)| Location {
            country: country.clone(),
            city,
            latitude,
            longitude,
            radius_km: radius.unwrap_or(self.default_radius_km),
        });
        out.country = country;
    }

    /// Whether and what each database is serving, with a one-line summary.
    pub fn status(&self) -> GeoStatus {
        let (city_error, asn_error) = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let city = slot_status(self.city.load().as_deref(), &self.city_path, city_error);
        let asn = slot_status(self.asn.load().as_deref(), &self.asn_path, asn_error);
        let summary = summarize(&city, &asn);
        GeoStatus {
            active: city.active,
            city,
            asn,
            summary,
        }
    }

    /// Reopens every database whose file has been replaced, swaps it in and
    /// clears the cache. Returns whether anything changed. A file that fails to
    /// open keeps the previous reader in service and is reported as an error
    /// (other databases are still reloaded).
    pub fn reload(&self) -> Result<bool, EnrichError> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        let mut first_error = None;
        for kind in [Kind::City, Kind::Asn] {
            let (slot, path) = match kind {
                Kind::City => (&self.city, &self.city_path),
                Kind::Asn => (&self.asn, &self.asn_path),
            };
            let Some(path) = path else { continue };
            match reload_slot(slot, path) {
                Ok(swapped) => {
                    changed |= swapped;
                    self.set_error(kind, None);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "GeoIP reload failed; keeping the previous database");
                    self.set_error(kind, Some(e.to_string()));
                    first_error.get_or_insert(e);
                }
            }
        }
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.cache.clear();
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    fn set_error(&self, kind: Kind, error: Option<String>) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match kind {
            Kind::City => errors.0 = error,
            Kind::Asn => errors.1 = error,
        }
    }
}

/// The autonomous system of `ip` and its organisation, if the database knows.
fn lookup_asn(db: &Db, ip: IpAddr) -> Option<(Option<u32>, Option<String>)> {
    let found = db.find(ip)?;
    let decoded = match db.layout {
        DbLayout::Geoip2 => found.decode::<geoip2::Asn>().map(|rec| {
            rec.map(|r| {
                (
                    r.autonomous_system_number,
                    r.autonomous_system_organization.map(str::to_owned),
                )
            })
        }),
        DbLayout::Flat => found
            .decode::<FlatAsn>()
            .map(|rec| rec.map(|r| (r.autonomous_system_number, r.autonomous_system_organization))),
    };
    match decoded {
        Ok(Some((asn, org))) => Some((asn, org.filter(|o| !o.is_empty()))),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(%ip, path = %db.path.display(), error = %e, "GeoIP ASN record not decodable");
            None
        }
    }
}

/// Swaps in a fresh reader if the file at `path` is not the one currently mapped.
fn reload_slot(slot: &ArcSwapOption<Db>, path: &Path) -> Result<bool, EnrichError> {
    let stamp = FileStamp::of(path).map_err(|e| EnrichError::GeoIp {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if slot.load().as_deref().is_some_and(|db| db.stamp == stamp) {
        return Ok(false);
    }
    let db = Db::open(path)?;
    let meta = db.reader.metadata();
    tracing::info!(
        path = %db.path.display(),
        database_type = %meta.database_type,
        build_epoch = meta.build_epoch,
        layout = %db.layout,
        "GeoIP database reloaded"
    );
    // The old reader is unmapped once the last in-flight lookup drops its Arc.
    slot.store(Some(Arc::new(db)));
    Ok(true)
}

fn slot_status(db: Option<&Db>, path: &Option<PathBuf>, last_error: Option<String>) -> DbStatus {
    let mut status = match db {
        Some(db) => db.status(),
        None => DbStatus {
            configured: path.is_some(),
            active: false,
            path: path.clone(),
            database_type: None,
            build_epoch: None,
            layout: None,
            ip_version: None,
            last_error: None,
        },
    };
    status.last_error = last_error;
    status
}

fn describe(db: &DbStatus) -> String {
    let kind = db.database_type.as_deref().unwrap_or("unknown type");
    let layout = db.layout.map(|l| l.to_string()).unwrap_or_default();
    let built = db
        .build_epoch
        .and_then(|e| time::OffsetDateTime::from_unix_timestamp(i64::try_from(e).ok()?).ok())
        .map(|t| t.date().to_string())
        .unwrap_or_else(|| "unknown date".to_owned());
    format!("{kind} ({layout} layout, built {built})")
}

fn summarize(city: &DbStatus, asn: &DbStatus) -> String {
    const NO_CITY: &str = "no city database configured (TOKENWARDEN_GEOIP_CITY)";
    const NO_ASN: &str = "no ASN database configured (TOKENWARDEN_GEOIP_ASN)";
    let mut text = match (city.active, asn.active) {
        (true, true) => format!(
            "GeoIP active: city {}, ASN {}",
            describe(city),
            describe(asn)
        ),
        (true, false) => format!(
            "GeoIP active: city {}; {NO_ASN}, so asn rules do not fire",
            describe(city)
        ),
        (false, true) => format!(
            "GeoIP partly active: {NO_CITY}, so geo_velocity and country rules do not fire; ASN {}",
            describe(asn)
        ),
        (false, false) => {
            format!("GeoIP inactive: {NO_CITY}; geo_velocity and country/asn rules do not fire")
        }
    };
    for (name, db) in [("city", city), ("ASN", asn)] {
        if let Some(error) = &db.last_error {
            text.push_str(&format!("; last {name} reload failed: {error}"));
        }
    }
    text
}
