//! User-agent fingerprints: the uap-core regexes (vendored, compiled once),
//! the reduction of a user-agent string to browser family + major version +
//! OS family + device class, and the per-string cache in front of it.
//!
//! A fingerprint deliberately ignores minor versions and OS versions, so that
//! routine browser and OS updates during a session do not look like a new client.

use std::fmt;
use std::sync::Arc;

use quick_cache::sync::Cache;
use serde::{Deserialize, Serialize};

use super::EnrichError;

/// uap-core 0.18.0 (npm), Apache-2.0; see `vendor/uap-core/`.
const REGEXES_YAML: &str = include_str!("../../vendor/uap-core/regexes.yaml");
/// Distinct user-agent strings remembered.
const CACHE_CAPACITY: usize = 10_000;
/// Longer strings are cut before parsing and caching: real ones are a few hundred
/// bytes, and an attacker-sized header must not cost regex time or cache memory.
const MAX_UA_BYTES: usize = 1024;
/// What uap reports when nothing matched.
const OTHER: &str = "Other";

/// The kind of device a client runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    Desktop,
    Mobile,
    Tablet,
    /// Crawlers and scripted HTTP clients (curl, python-requests, ...).
    Bot,
    Unknown,
}

impl DeviceClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desktop => "desktop",
            Self::Mobile => "mobile",
            Self::Tablet => "tablet",
            Self::Bot => "bot",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for DeviceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What stays the same for one client across routine updates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UaFingerprint {
    /// Browser or client family, e.g. `Firefox`, `Chrome Mobile`, `Python Requests`.
    pub family: String,
    /// Major version only, e.g. `133`.
    pub major: Option<String>,
    /// OS family without version, e.g. `Linux`, `Windows`, `iOS`.
    pub os: String,
    pub device: DeviceClass,
}

/// The key form (see [`UaFingerprint::key`]), written without building a string.
impl fmt::Display for UaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut result = Ok(());
        self.key_pieces(|piece| {
            if result.is_ok() {
                result = f.write_str(piece);
            }
        });
        result
    }
}

impl UaFingerprint {
    /// A fingerprint from its four parts (a recorded key read back, a test's client).
    pub fn new(family: String, major: Option<String>, os: String, device: DeviceClass) -> Self {
        Self {
            family,
            major,
            os,
            device,
        }
    }

    /// A compact stable form, e.g. `Firefox/133/Linux/desktop` (`-` for no version).
    pub fn key(&self) -> String {
        self.to_string()
    }

    /// The key, piece by piece, to whatever writes it: audit events write it
    /// straight into their JSON line, escaped as it goes, without the formatting
    /// machinery.
    pub fn key_pieces(&self, mut write: impl FnMut(&str)) {
        let major = self.major.as_deref().unwrap_or("-");
        for part in [self.family.as_str(), major, self.os.as_str()] {
            // A `/` inside a name would forge a different key.
            for (i, piece) in part.split('/').enumerate() {
                if i > 0 {
                    write("_");
                }
                write(piece);
            }
            write("/");
        }
        write(self.device.as_str());
    }

    /// The fingerprint of a request that sent no user agent.
    fn empty() -> Self {
        Self::new(
            OTHER.to_owned(),
            None,
            OTHER.to_owned(),
            DeviceClass::Unknown,
        )
    }
}

/// The compiled uap-core parser and its cache. Build it once and share it:
/// compiling the regexes takes a noticeable fraction of a second.
pub struct UaParser {
    extractor: ua_parser::Extractor<'static>,
    cache: Cache<String, Arc<UaFingerprint>>,
    empty: Arc<UaFingerprint>,
}

impl fmt::Debug for UaParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UaParser")
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl UaParser {
    /// Compiles the vendored regexes.
    pub fn new() -> Result<UaParser, EnrichError> {
        let regexes: ua_parser::Regexes<'static> = serde_saphyr::from_str(REGEXES_YAML)
            .map_err(|e| EnrichError::UserAgent(format!("regexes.yaml: {e}")))?;
        let extractor = ua_parser::Extractor::try_from(regexes)
            .map_err(|e| EnrichError::UserAgent(format!("compiling regexes.yaml: {e}")))?;
        Ok(UaParser {
            extractor,
            cache: Cache::new(CACHE_CAPACITY),
            empty: Arc::new(UaFingerprint::empty()),
        })
    }

    /// The fingerprint of a `User-Agent` header value. Never fails: anything
    /// unrecognised comes back as `Other` with an `unknown` device. Shared: every
    /// client with the same header (while it is cached) holds the same fingerprint.
    pub fn fingerprint(&self, ua: &str) -> Arc<UaFingerprint> {
        let ua = truncate(ua.trim(), MAX_UA_BYTES);
        if ua.is_empty() {
            return Arc::clone(&self.empty);
        }
        if let Some(hit) = self.cache.get(ua) {
            return hit;
        }
        let fingerprint = Arc::new(self.parse(ua));
        self.cache.insert(ua.to_owned(), Arc::clone(&fingerprint));
        fingerprint
    }

    fn parse(&self, ua: &str) -> UaFingerprint {
        let (agent, os, device) = self.extractor.extract(ua);
        let (family, major) = match agent {
            Some(a) => (non_empty(&a.family), a.major.and_then(clean_major)),
            None => (OTHER.to_owned(), None),
        };
        let os = os.map_or_else(|| OTHER.to_owned(), |o| non_empty(&o.os));
        let (device_family, brand, model) = match device {
            Some(d) => (
                d.device.into_owned(),
                d.brand.map(|b| b.into_owned()),
                d.model.map(|m| m.into_owned()),
            ),
            None => (OTHER.to_owned(), None, None),
        };
        let device = classify(
            ua,
            &family,
            &os,
            &device_family,
            brand.as_deref(),
            model.as_deref(),
        );
        UaFingerprint::new(family, major, os, device)
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn non_empty(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        OTHER.to_owned()
    } else {
        s.to_owned()
    }
}

fn clean_major(major: &str) -> Option<String> {
    let major = major.trim();
    (!major.is_empty()).then(|| major.to_owned())
}

/// Client families (as uap names them) that are programs, not people at a browser.
const SCRIPTED_FAMILIES: &[&str] = &[
    "Python Requests",
    "Python-urllib",
    "Python aiohttp",
    "aiohttp",
    "curl",
    "Wget",
    "Go-http-client",
    "libwww-perl",
    "Apache-HttpClient",
    "Java",
    "HTTPie",
    "PostmanRuntime",
    "axios",
    "node-fetch",
    "undici",
    "HeadlessChrome",
];

/// OS families whose "Other"-device clients are desktop computers.
const DESKTOP_OS: &[&str] = &[
    "Windows",
    "Mac OS X",
    "macOS",
    "Linux",
    "Ubuntu",
    "Debian",
    "Fedora",
    "Red Hat",
    "SUSE",
    "openSUSE",
    "Mint",
    "Arch Linux",
    "Gentoo",
    "Slackware",
    "Mandriva",
    "CentOS",
    "Chrome OS",
    "ChromeOS",
    "FreeBSD",
    "OpenBSD",
    "NetBSD",
    "Solaris",
    "SunOS",
];

/// OS families that only run on phones (their tablets are caught earlier).
const MOBILE_OS: &[&str] = &[
    "iOS",
    "Windows Phone",
    "BlackBerry OS",
    "KaiOS",
    "Firefox OS",
    "Symbian OS",
    "Tizen",
    "Sailfish",
];

fn classify(
    ua: &str,
    family: &str,
    os: &str,
    device: &str,
    brand: Option<&str>,
    model: Option<&str>,
) -> DeviceClass {
    let lower = ua.to_ascii_lowercase();
    if device == "Spider" || brand == Some("Spider") || SCRIPTED_FAMILIES.contains(&family) {
        return DeviceClass::Bot;
    }
    let device_lower = device.to_ascii_lowercase();
    let model_lower = model.unwrap_or_default().to_ascii_lowercase();
    let tablet_named = |s: &str| s.contains("ipad") || s.contains("tablet") || s.contains("kindle");
    // Android tablets omit "Mobile" from their UA; Android phones include it.
    let android_tablet = os == "Android" && !lower.contains("mobile");
    if tablet_named(&device_lower)
        || tablet_named(&model_lower)
        || lower.contains("ipad")
        || lower.contains("tablet")
        || lower.contains(" silk/")
        || android_tablet
    {
        return DeviceClass::Tablet;
    }
    if device_lower.contains("iphone")
        || device_lower.contains("ipod")
        || device_lower.contains("phone")
        || os == "Android"
        || MOBILE_OS.contains(&os)
        || lower.contains("mobi")
    {
        return DeviceClass::Mobile;
    }
    // uap names Macs "Mac" and leaves most other computers "Other".
    if (device == OTHER || device == "Mac") && DESKTOP_OS.contains(&os) {
        return DeviceClass::Desktop;
    }
    DeviceClass::Unknown
}
