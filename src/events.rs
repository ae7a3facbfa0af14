//! Audit events: one per decision (session open, request, refresh, reauth,
//! revoke), in the replay format of PRODUCT.md, never carrying a raw token.
//! Recording never waits: events go into a bounded queue and a writer task stores
//! them in batches; when the queue is full the event is dropped and counted.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::enrich::{ClientInfo, UaFingerprint};
use crate::monitor::RequestInfo;
use crate::risk::{Evaluation, Reason};
use crate::store::{SharedStore, StoredEvent};

/// Bytes reserved for one event's JSON line.
const LINE_CAPACITY: usize = 1024;

std::thread_local! {
    /// Where each event's line is written before it is copied out at its length:
    /// a line is 500–700 bytes, and a queued line keeps no spare room.
    static LINE: std::cell::RefCell<String> =
        std::cell::RefCell::new(String::with_capacity(LINE_CAPACITY));
}

/// The stored form: the columns events are filtered by, plus the JSON line. A NUL character (which
/// PostgreSQL refuses in text, and which would fail the whole batch it travels
/// in) is stored as U+FFFD.
///
/// Made on the request path, as the event is recorded: its strings are read while
/// they are still in the cache, and freed on the thread that made them.
fn stored(e: &EventRef<'_>) -> Option<StoredEvent> {
    let clean = |s: &str| {
        if s.contains('\0') {
            s.replace('\0', "\u{fffd}")
        } else {
            s.to_owned()
        }
    };
    let write = |line: &mut String| {
        line.clear();
        let written_ms = e.write_json(line).ok()?;
        // Allocated at the line's length.
        let written = line.clone();
        // One very long line (a huge user agent) does not stay with the thread.
        if line.capacity() > 4 * LINE_CAPACITY {
            line.clear();
            line.shrink_to(LINE_CAPACITY);
        }
        Some((written, written_ms))
    };
    let (mut event, written_ms) = LINE
        .try_with(|buffer| match buffer.try_borrow_mut() {
            Ok(mut buffer) => write(&mut buffer),
            Err(_) => write(&mut String::new()),
        })
        // The thread is exiting and its buffer is gone: a buffer of its own.
        .unwrap_or_else(|_| write(&mut String::new()))?;
    // Only a line with an escape can hold one; most have none, and a SIMD search
    // for the backslash is a fraction of a search for the escape.
    if memchr::memchr(b'\\', event.as_bytes()).is_some() && event.contains("\\u0000") {
        event = without_nul_escapes(&event);
    }
    let ts_ms = match (written_ms, e.ts) {
        (Some(ms), _) => ms,
        (None, Ts::Text(text)) => parse_ms(text)?,
        // Never: a time from the clock is written from it.
        (None, Ts::Millis(ms)) => ms,
    };
    Some(StoredEvent {
        ts_ms,
        kind: Cow::Borrowed(e.kind.as_str()),
        session_id: e.session_id.map(clean),
        subject: e.subject.map(clean),
        decision: e.decision.map(|d| {
            // One of the engine's words (its own names, read as serde reads them)
            // is borrowed; any other text (a line read back) is copied.
            use serde::de::IntoDeserializer;
            let word: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                d.into_deserializer();
            crate::risk::Decision::deserialize(word)
                .map_or_else(|_| Cow::Owned(clean(d)), |w| Cow::Borrowed(w.as_str()))
        }),
        event,
    })
}

/// A JSON object being written after its first field (`{"ts":"…"`, always there):
/// every other field is written with its `,"name":` prefix, given whole (a text's
/// prefix with its opening quote: `,"name":"`).
struct Line<'a> {
    out: &'a mut String,
}

// Inlined into `write_json`, where each prefix is a constant: its copy is then a
// few moves of known size, not a call to `memcpy`.
impl Line<'_> {
    /// `prefix` ends with the value's opening quote.
    #[inline(always)]
    fn text(&mut self, prefix: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.out.push_str(prefix);
            escape_into(self.out, value);
            self.out.push('"');
        }
    }

    /// An integer as serde_json writes it (itoa, as serde_json does).
    #[inline(always)]
    fn int(&mut self, prefix: &str, value: Option<u32>) {
        if let Some(value) = value {
            self.out.push_str(prefix);
            self.out.push_str(itoa::Buffer::new().format(value));
        }
    }

    /// A float as serde_json writes it: zmij's shortest form, or `null` for NaN and
    /// the infinities.
    #[inline(always)]
    fn float(&mut self, prefix: &str, value: Option<f64>) {
        if let Some(value) = value {
            self.out.push_str(prefix);
            if value.is_finite() {
                self.out.push_str(zmij::Buffer::new().format_finite(value));
            } else {
                self.out.push_str("null");
            }
        }
    }
}

/// Text written into a JSON string as serde_json escapes it: `"` and `\` with a
/// backslash; the control characters as `\b`, `\t`, `\n`, `\f`, `\r` or `\u00xx`;
/// everything else as it is.
///
/// Inlined where it is called: a text with nothing to escape (almost every one) is
/// checked and copied there, and only one with something to escape makes a call.
#[inline(always)]
fn escape_into(out: &mut String, text: &str) {
    if needs_escape(text.as_bytes()) {
        escape_each(out, text);
    } else {
        out.push_str(text);
    }
}

/// [`escape_into`] for a text with something to escape.
#[cold]
#[inline(never)]
fn escape_each(out: &mut String, text: &str) {
    let bytes = text.as_bytes();
    const HEX: &[char; 16] = &[
        '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
    ];
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => '"',
            b'\\' => '\\',
            0x08 => 'b',
            b'\t' => 't',
            b'\n' => 'n',
            0x0c => 'f',
            b'\r' => 'r',
            0x00..=0x1f => 'u',
            _ => continue,
        };
        // `i` is the index of an ASCII character, so a boundary between characters.
        out.push_str(&text[start..i]);
        out.push('\\');
        out.push(short);
        if short == 'u' {
            out.push_str("00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
}

/// Whether `bytes` hold a byte serde_json escapes: a control character, `"` or `\`.
///
/// Most of a line's texts are short (an id, a method, a country), and one shorter
/// than 32 bytes is looked at as up to four 8-byte words rather than byte by byte.
#[inline]
fn needs_escape(bytes: &[u8]) -> bool {
    if bytes.len() >= 32 {
        // One pass without an early exit, which the compiler turns into wide compares.
        return bytes.iter().fold(false, |any, &b| any | escaped(b));
    }
    if let Some(last) = bytes.last_chunk::<8>() {
        let (words, _) = bytes.as_chunks::<8>();
        // The last word overlaps the others when the length is not a multiple of 8:
        // a byte looked at twice changes nothing.
        let any = words
            .iter()
            .fold(special_bytes(u64::from_ne_bytes(*last)), |any, w| {
                any | special_bytes(u64::from_ne_bytes(*w))
            });
        return any != 0;
    }
    if let (Some(first), Some(last)) = (bytes.first_chunk::<4>(), bytes.last_chunk::<4>()) {
        let word =
            u64::from(u32::from_ne_bytes(*first)) | (u64::from(u32::from_ne_bytes(*last)) << 32);
        return special_bytes(word) != 0;
    }
    bytes.iter().copied().any(escaped)
}

/// A byte serde_json escapes.
#[inline]
fn escaped(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Non-zero when a byte of `word` is below 0x20, `"` or `\`. Each test is the
/// classic "has a zero byte" one (`(x - 0x01…01) & !x & 0x80…80`): its bits may
/// mark the wrong byte, but it is zero exactly when no byte of `x` qualifies,
/// and that is all that is asked.
#[inline]
fn special_bytes(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Below 0x20: exact for any bound up to 0x80.
    let control = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * u64::from(b'"'));
    let quote = quote.wrapping_sub(ONES) & !quote;
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let backslash = backslash.wrapping_sub(ONES) & !backslash;
    (control | quote | backslash) & HIGHS
}

/// A JSON line with each escaped NUL (`\u0000`) written as U+FFFD (`\ufffd`). Only
/// an escape is rewritten: a backslash escaped as `\\` followed by the text `u0000`
/// is the value's own text and stays.
fn without_nul_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("\\u0000") {
            out.push_str("\\ufffd");
            rest = after;
        } else {
            // An escape is a backslash and the character after it, copied whole.
            let end = 1 + rest[1..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SessionOpen,
    Request,
    Refresh,
    Reauth,
    Revoke,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionOpen => "session_open",
            Self::Request => "request",
            Self::Refresh => "refresh",
            Self::Reauth => "reauth",
            Self::Revoke => "revoke",
        }
    }
}

/// One line of the audit log and of the replay format. Fields without a value
/// (and an empty `reasons`) are left out of the line; a reader takes them as absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// RFC 3339, milliseconds.
    pub ts: String,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Cow<'static, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sec_fetch_site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u32>,
    /// One of a few fixed words when recorded here; any text when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Cow<'static, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_risk: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_hash: Option<Arc<str>>,
    /// Enrichment at the time (replay recomputes it when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latitude: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longitude: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radius_km: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ua_fingerprint: Option<UaKey>,
    /// Why, for revocations (`logout`, `refresh_reuse`, `risk: …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// An event's user-agent fingerprint (`Firefox/133/Linux/desktop`). Recorded here
/// it is the client's shared fingerprint, whose key is written straight into the
/// JSON line, so no event builds a string for it; read from a line it is that text.
#[derive(Debug, Clone)]
pub enum UaKey {
    Shared(Arc<UaFingerprint>),
    Text(String),
}

impl UaKey {
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Self::Shared(f) => Cow::Owned(f.key()),
            Self::Text(t) => Cow::Borrowed(t),
        }
    }
}

impl PartialEq for UaKey {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

impl Serialize for UaKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Shared(f) => s.collect_str(f),
            Self::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for UaKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::Text)
    }
}

/// An address as text, as it displays (see [`write_ip`]).
fn ip_text(ip: std::net::IpAddr) -> String {
    let mut text = String::with_capacity(45);
    write_ip(&mut text, ip);
    text
}

/// An address written as it displays. An IPv4 address (nearly every request's) is
/// written octet by octet with itoa, as the line's integers are, without the
/// formatting machinery.
fn write_ip(out: &mut String, ip: std::net::IpAddr) {
    use std::fmt::Write;
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
        }
        std::net::IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

/// A URL without its query string and fragment.
fn without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or_default()
}

/// RFC 3339 with milliseconds, UTC; the epoch for a time out of range.
pub fn rfc3339_ms(ms: i64) -> String {
    let mut out = String::with_capacity(24);
    write_rfc3339_ms(&mut out, ms);
    out
}

/// [`rfc3339_ms`] written into `out`; returns the milliseconds written (`ms`, or
/// 0 for a time out of range).
fn write_rfc3339_ms(out: &mut String, ms: i64) -> i64 {
    // Every event of a second shares its date and time of day: formatted once per
    // second and thread, then only the milliseconds are appended.
    thread_local! {
        static SECOND: std::cell::RefCell<(i64, String)> =
            const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let (second, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let with_millis = |out: &mut String, prefix: &str| {
        out.push_str(prefix);
        out.push('.');
        // 0..=999: three digits, zero-padded.
        for d in [millis / 100, millis / 10 % 10, millis % 10] {
            out.push(char::from(b'0' + u8::try_from(d).unwrap_or(0)));
        }
        out.push('Z');
    };
    let written = SECOND
        .try_with(|cell| {
            let mut cached = cell.borrow_mut();
            if cached.0 != second {
                cached.1 = format_second(second)?;
                cached.0 = second;
            }
            with_millis(out, &cached.1);
            Some(())
        })
        .ok()
        .flatten()
        .or_else(|| format_second(second).map(|p| with_millis(out, &p)));
    match written {
        Some(()) => ms,
        None => {
            out.push_str("1970-01-01T00:00:00.000Z");
            0
        }
    }
}

/// Milliseconds since the epoch of an RFC 3339 time. The events of one second share
/// their first 19 characters (what [`rfc3339_ms`] writes): that second is parsed once
/// per thread, then only the milliseconds are read; anything else is parsed in full.
fn parse_ms(ts: &str) -> Option<i64> {
    thread_local! {
        static SECOND: std::cell::RefCell<(String, i64)> =
            const { std::cell::RefCell::new((String::new(), 0)) };
    }
    let full = || crate::clock::parse_rfc3339_ms(ts).ok();
    // `YYYY-MM-DDTHH:MM:SS.mmmZ`, the only shape this fast path reads.
    let b = ts.as_bytes();
    if b.len() != 24 || b[19] != b'.' || b[23] != b'Z' || !b[20..23].iter().all(u8::is_ascii_digit)
    {
        return full();
    }
    let millis = b[20..23]
        .iter()
        .fold(0_i64, |n, d| n * 10 + i64::from(d - b'0'));
    let (prefix, _) = ts.split_at(19);
    SECOND
        .try_with(|cell| {
            let mut cached = cell.borrow_mut();
            if cached.0 != prefix {
                let ms = full()?;
                cached.0.clear();
                cached.0.push_str(prefix);
                cached.1 = (ms - millis).div_euclid(1000);
            }
            Some(cached.1 * 1000 + millis)
        })
        .ok()
        .flatten()
        .or_else(full)
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix second, UTC; `None` out of range (a year
/// before 0 or after 9999, which RFC 3339 cannot write).
fn format_second(second: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(second).ok()?;
    if !(0..=9999).contains(&t.year()) {
        return None;
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    t.format(&fmt).ok()
}

impl Event {
    /// The event's JSON line: the text `serde_json::to_string` writes for it (a test
    /// holds the two equal), written through its view ([`EventRef::write_json`]).
    pub fn write_json(&self, out: &mut String) -> serde_json::Result<()> {
        self.view().write_json(out).map(|_| ())
    }

    /// The event as the recorder and the line's writer read it, borrowed.
    pub fn view(&self) -> EventRef<'_> {
        // Taken apart whole, so that a field added to `Event` cannot be left out here.
        let Event {
            ts,
            kind,
            session_id,
            subject,
            ip,
            user_agent,
            method,
            path,
            referrer,
            origin,
            sec_fetch_site,
            cost,
            decision,
            score,
            session_risk,
            reasons,
            rules_hash,
            country,
            city,
            asn,
            latitude,
            longitude,
            radius_km,
            ua_fingerprint,
            detail,
        } = self;
        EventRef {
            ts: Ts::Text(ts),
            kind: *kind,
            session_id: session_id.as_deref(),
            subject: subject.as_deref(),
            ip: ip.as_deref().map(IpRef::Text),
            user_agent: user_agent.as_deref(),
            method: method.as_deref(),
            path: path.as_deref(),
            referrer: referrer.as_deref(),
            origin: origin.as_deref(),
            sec_fetch_site: sec_fetch_site.as_deref(),
            cost: *cost,
            decision: decision.as_deref(),
            score: *score,
            session_risk: *session_risk,
            reasons,
            rules_hash: rules_hash.as_deref(),
            country: country.as_deref(),
            city: city.as_deref(),
            asn: *asn,
            latitude: *latitude,
            longitude: *longitude,
            radius_km: *radius_km,
            ua_fingerprint: ua_fingerprint.as_ref().map(|ua| match ua {
                UaKey::Shared(f) => UaRef::Shared(f),
                UaKey::Text(t) => UaRef::Text(t),
            }),
            detail: detail.as_deref().map(Cow::Borrowed),
        }
    }
}

/// An event's time: written from the clock's milliseconds, or text read from a line.
#[derive(Debug, Clone, Copy)]
pub enum Ts<'a> {
    Millis(i64),
    Text(&'a str),
}

/// An event's client address: the address itself, or text read from a line.
#[derive(Debug, Clone, Copy)]
pub enum IpRef<'a> {
    Addr(std::net::IpAddr),
    Text(&'a str),
}

/// An event's user-agent fingerprint: the client's shared one, or text read from a line.
#[derive(Debug, Clone, Copy)]
pub enum UaRef<'a> {
    Shared(&'a Arc<UaFingerprint>),
    Text(&'a str),
}

/// An event as it is recorded: every field borrowed from what the caller already
/// holds (the request, the token's claims, the client, the evaluation), so that
/// recording it copies no text but the JSON line it writes. The builders below
/// say what each event carries; an [`Event`] (a line read back) is written
/// through its [`Event::view`], so the line has one writer.
#[derive(Debug, Clone)]
pub struct EventRef<'a> {
    pub ts: Ts<'a>,
    pub kind: EventKind,
    pub session_id: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub ip: Option<IpRef<'a>>,
    pub user_agent: Option<&'a str>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub referrer: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub sec_fetch_site: Option<&'a str>,
    pub cost: Option<u32>,
    pub decision: Option<&'a str>,
    pub score: Option<u32>,
    pub session_risk: Option<f64>,
    pub reasons: &'a [Reason],
    pub rules_hash: Option<&'a str>,
    pub country: Option<&'a str>,
    pub city: Option<&'a str>,
    pub asn: Option<u32>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub radius_km: Option<f64>,
    pub ua_fingerprint: Option<UaRef<'a>>,
    pub detail: Option<Cow<'a, str>>,
}

impl<'a> EventRef<'a> {
    pub fn new(kind: EventKind, at_ms: i64) -> Self {
        Self {
            ts: Ts::Millis(at_ms),
            kind,
            session_id: None,
            subject: None,
            ip: None,
            user_agent: None,
            method: None,
            path: None,
            referrer: None,
            origin: None,
            sec_fetch_site: None,
            cost: None,
            decision: None,
            score: None,
            session_risk: None,
            reasons: &[],
            rules_hash: None,
            country: None,
            city: None,
            asn: None,
            latitude: None,
            longitude: None,
            radius_km: None,
            ua_fingerprint: None,
            detail: None,
        }
    }

    pub fn session(mut self, session_id: &'a str, subject: &'a str) -> Self {
        self.session_id = Some(session_id);
        self.subject = Some(subject);
        self
    }

    pub fn request(mut self, r: &'a RequestInfo) -> Self {
        self.ip = r.ip.map(IpRef::Addr);
        self.user_agent = r.user_agent.as_deref();
        self.method = r.method.as_deref();
        // Query strings and fragments can carry secrets (tokens in links): never recorded.
        // Rules only look at path prefixes and the referrer's origin.
        self.path = r.path.as_deref().map(without_query);
        self.referrer = r.referrer.as_deref().map(without_query);
        self.origin = r.origin.as_deref();
        self.sec_fetch_site = r.sec_fetch_site.as_deref();
        self.cost = r.cost;
        self
    }

    pub fn client(mut self, c: &'a ClientInfo) -> Self {
        self.ip.get_or_insert(IpRef::Addr(c.ip));
        self.country = c.country.as_deref();
        self.asn = c.asn;
        if let Some(l) = &c.location {
            self.city = l.city.as_deref();
            self.latitude = Some(l.latitude);
            self.longitude = Some(l.longitude);
            self.radius_km = Some(l.radius_km);
        }
        self.ua_fingerprint = Some(UaRef::Shared(&c.ua));
        self
    }

    pub fn evaluation(mut self, e: &'a Evaluation) -> Self {
        self.decision = Some(e.decision.as_str());
        self.score = Some(e.score);
        self.session_risk = Some(e.session_risk);
        self.reasons = &e.reasons;
        self.rules_hash = Some(&e.rules_hash);
        self
    }

    pub fn decision(mut self, decision: &'a str) -> Self {
        self.decision = Some(decision);
        self
    }

    pub fn detail(mut self, detail: impl Into<Cow<'a, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The event's JSON line: the text `serde_json::to_string` writes for the
    /// [`Event`] it makes (a test holds the two equal), written field by field
    /// into a `String`, so it is never checked for UTF-8 again. Text is checked
    /// for characters to escape in one pass over it and copied whole when there
    /// are none (almost always), where serde_json looks each byte up in turn; the
    /// time and the address are written from their values, numbers with the
    /// crates serde_json uses (itoa, zmij), and the reasons are left to serde_json.
    ///
    /// Returns the time written, in milliseconds since the epoch, when it was
    /// written from the clock's (the epoch for a time out of range).
    pub fn write_json(&self, out: &mut String) -> serde_json::Result<Option<i64>> {
        // Taken apart whole, so that a field added here cannot be left out.
        let EventRef {
            ts,
            kind,
            session_id,
            subject,
            ip,
            user_agent,
            method,
            path,
            referrer,
            origin,
            sec_fetch_site,
            cost,
            decision,
            score,
            session_risk,
            reasons,
            rules_hash,
            country,
            city,
            asn,
            latitude,
            longitude,
            radius_km,
            ua_fingerprint,
            detail,
        } = self;
        out.push_str("{\"ts\":\"");
        let written_ms = match *ts {
            // RFC 3339 digits and separators: nothing to escape.
            Ts::Millis(ms) => Some(write_rfc3339_ms(out, ms)),
            Ts::Text(text) => {
                escape_into(out, text);
                None
            }
        };
        out.push('"');
        let mut line = Line { out };
        line.text(",\"kind\":\"", Some(kind.as_str()));
        line.text(",\"session_id\":\"", *session_id);
        line.text(",\"subject\":\"", *subject);
        match ip {
            Some(IpRef::Addr(addr)) => {
                // Digits, dots and colons: nothing to escape.
                line.out.push_str(",\"ip\":\"");
                write_ip(line.out, *addr);
                line.out.push('"');
            }
            Some(IpRef::Text(text)) => line.text(",\"ip\":\"", Some(text)),
            None => {}
        }
        line.text(",\"user_agent\":\"", *user_agent);
        line.text(",\"method\":\"", *method);
        line.text(",\"path\":\"", *path);
        line.text(",\"referrer\":\"", *referrer);
        line.text(",\"origin\":\"", *origin);
        line.text(",\"sec_fetch_site\":\"", *sec_fetch_site);
        line.int(",\"cost\":", *cost);
        line.text(",\"decision\":\"", *decision);
        line.int(",\"score\":", *score);
        line.float(",\"session_risk\":", *session_risk);
        if !reasons.is_empty() {
            line.out.push_str(",\"reasons\":");
            line.out.push_str(&serde_json::to_string(reasons)?);
        }
        line.text(",\"rules_hash\":\"", *rules_hash);
        line.text(",\"country\":\"", *country);
        line.text(",\"city\":\"", *city);
        line.int(",\"asn\":", *asn);
        line.float(",\"latitude\":", *latitude);
        line.float(",\"longitude\":", *longitude);
        line.float(",\"radius_km\":", *radius_km);
        match ua_fingerprint {
            Some(UaRef::Shared(f)) => {
                line.out.push_str(",\"ua_fingerprint\":\"");
                // Written straight into the line, escaped as it goes.
                f.key_pieces(|piece| escape_into(line.out, piece));
                line.out.push('"');
            }
            Some(UaRef::Text(t)) => line.text(",\"ua_fingerprint\":\"", Some(t)),
            None => {}
        }
        line.text(",\"detail\":\"", detail.as_deref());
        line.out.push('}');
        Ok(written_ms)
    }
}

impl From<EventRef<'_>> for Event {
    /// The event as a line written for it reads back (the time and the address as
    /// their text).
    fn from(e: EventRef<'_>) -> Self {
        Self {
            ts: match e.ts {
                Ts::Millis(ms) => rfc3339_ms(ms),
                Ts::Text(t) => t.to_owned(),
            },
            kind: e.kind,
            session_id: e.session_id.map(str::to_owned),
            subject: e.subject.map(str::to_owned),
            ip: e.ip.map(|ip| match ip {
                IpRef::Addr(addr) => ip_text(addr),
                IpRef::Text(t) => t.to_owned(),
            }),
            user_agent: e.user_agent.map(str::to_owned),
            method: e.method.map(|m| Cow::Owned(m.to_owned())),
            path: e.path.map(str::to_owned),
            referrer: e.referrer.map(str::to_owned),
            origin: e.origin.map(str::to_owned),
            sec_fetch_site: e.sec_fetch_site.map(str::to_owned),
            cost: e.cost,
            decision: e.decision.map(|d| Cow::Owned(d.to_owned())),
            score: e.score,
            session_risk: e.session_risk,
            reasons: e.reasons.to_vec(),
            rules_hash: e.rules_hash.map(Arc::from),
            country: e.country.map(Arc::from),
            city: e.city.map(Arc::from),
            asn: e.asn,
            latitude: e.latitude,
            longitude: e.longitude,
            radius_km: e.radius_km,
            ua_fingerprint: e.ua_fingerprint.map(|ua| match ua {
                UaRef::Shared(f) => UaKey::Shared(Arc::clone(f)),
                UaRef::Text(t) => UaKey::Text(t.to_owned()),
            }),
            detail: e.detail.map(Cow::into_owned),
        }
    }
}

/// Most events stored in one batch (one transaction on SQLite, one statement on
/// PostgreSQL).
pub const BATCH: usize = 2000;
/// Longest an event waits for its batch to fill before it is written.
pub const LINGER: Duration = Duration::from_millis(100);

/// The bounded queue in front of the event writer, and live subscribers.
pub struct EventSink {
    tx: mpsc::Sender<StoredEvent>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    live: broadcast::Sender<Arc<String>>,
    /// Queued, or taken and then found impossible to write as a line (counted
    /// in `dropped_failed` too).
    accepted: AtomicU64,
    /// Dropped because the queue was full.
    dropped_full: AtomicU64,
    /// Accepted, but not stored: the database refused the batch (or, never seen,
    /// the event could not be written as a line).
    dropped_failed: AtomicU64,
    written: AtomicU64,
    capacity: usize,
    /// Wakes the writer while a batch gathers, once half a batch waits in the queue.
    filling: tokio::sync::Notify,
}

impl EventSink {
    /// The sink and the receiving end for [`EventSink::run_writer`].
    pub fn new(
        capacity: usize,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> (Arc<Self>, mpsc::Receiver<StoredEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (live, _) = broadcast::channel(1024);
        (
            Arc::new(Self {
                tx,
                metrics,
                live,
                accepted: AtomicU64::new(0),
                dropped_full: AtomicU64::new(0),
                dropped_failed: AtomicU64::new(0),
                written: AtomicU64::new(0),
                capacity: capacity.max(1),
                filling: tokio::sync::Notify::new(),
            }),
            rx,
        )
    }

    /// Queues the event as its stored form (its line written here, on the request
    /// path); never waits. A full queue drops it and counts the drop.
    pub fn record(&self, event: EventRef<'_>) {
        if let Some(m) = &self.metrics {
            m.observe(&event);
        }
        // The queue's place is taken first: when the database cannot keep up and
        // nobody watches live, a dropped event costs no line.
        let place = self.tx.try_reserve().ok();
        let watched = self.live.receiver_count() > 0;
        if place.is_none() && !watched {
            self.dropped_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(row) = stored(&event) else {
            // An event that cannot be encoded counts as lost, not silently.
            if place.is_some() {
                self.accepted.fetch_add(1, Ordering::Relaxed);
                self.dropped_failed.fetch_add(1, Ordering::Relaxed);
            } else {
                self.dropped_full.fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        if watched {
            // Live subscribers see the line as it is stored.
            let _ = self.live.send(Arc::new(row.event.clone()));
        }
        if let Some(place) = place {
            place.send(row);
            self.accepted.fetch_add(1, Ordering::Relaxed);
            let queued = self.capacity.saturating_sub(self.tx.capacity());
            if queued * 2 >= self.batch_limit() {
                self.filling.notify_one();
            }
        } else {
            self.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The batch never holds more than the queue does: at most twice the configured
    /// queue is ever in memory, and a stalled database fills the queue as soon.
    fn batch_limit(&self) -> usize {
        BATCH.min(self.capacity)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<String>> {
        self.live.subscribe()
    }

    /// Events lost: queue full, the database refused them, or they could not be
    /// written as a line.
    pub fn dropped(&self) -> u64 {
        self.dropped_full.load(Ordering::Relaxed) + self.dropped_failed.load(Ordering::Relaxed)
    }

    /// Dropped because the queue was full (the database could not keep up).
    pub fn dropped_queue_full(&self) -> u64 {
        self.dropped_full.load(Ordering::Relaxed)
    }

    /// Every queued event has been written or counted as lost.
    pub fn settled(&self) -> bool {
        self.written.load(Ordering::Relaxed) + self.dropped_failed.load(Ordering::Relaxed)
            >= self.accepted.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Events accepted and not yet stored: those in the queue and those in the
    /// batch being gathered or written.
    pub fn depth(&self) -> usize {
        let done =
            self.written.load(Ordering::Relaxed) + self.dropped_failed.load(Ordering::Relaxed);
        usize::try_from(self.accepted.load(Ordering::Relaxed).saturating_sub(done))
            .unwrap_or(usize::MAX)
    }

    /// Stores queued events in batches until the queue closes. A failed batch is
    /// logged and counted as dropped; the writer goes on.
    ///
    /// A batch is written when it holds [`BATCH`] events or [`LINGER`] after its
    /// first event, whichever comes first: fuller batches wake the database less
    /// often at low rates, and a busy queue never waits for the timer.
    ///
    /// While a batch gathers, the writer sleeps until its deadline or until half a
    /// batch waits in the queue ([`EventSink::record`] wakes it then), not at every
    /// event: at a moderate rate a wake-up per request was a visible share of the CPU
    /// each request costs.
    pub async fn run_writer(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<StoredEvent>,
        store: SharedStore,
    ) {
        let limit = self.batch_limit();
        let mut batch = Vec::with_capacity(limit);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            let deadline = tokio::time::Instant::now() + LINGER;
            'gather: loop {
                while batch.len() < limit {
                    match rx.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        // The sink is gone: store what there is now.
                        Err(mpsc::error::TryRecvError::Disconnected) => break 'gather,
                    }
                }
                if batch.len() >= limit || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = self.filling.notified() => {}
                }
            }
            let rows: Arc<[StoredEvent]> = batch.drain(..).collect();
            let mut result = store.insert_events(Arc::clone(&rows)).await;
            if result.is_err() {
                // One retry covers a blip (a failover, a lock timeout) without losing the batch.
                tokio::time::sleep(Duration::from_millis(200)).await;
                result = store.insert_events(Arc::clone(&rows)).await;
            }
            match result {
                Ok(()) => {
                    self.written.fetch_add(rows.len() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.dropped_failed
                        .fetch_add(rows.len() as u64, Ordering::Relaxed);
                    tracing::warn!(error = %e, events = rows.len(), "cannot store audit events; dropped");
                    // Give a struggling database a moment instead of hammering it.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, at_ms: i64) -> Event {
        Event::from(EventRef::new(kind, at_ms))
    }

    #[test]
    fn addresses_are_written_as_they_display() {
        for ip in [
            "81.2.69.142",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        // Every octet, in every place.
        for octet in 0..=255u8 {
            for place in 0..4 {
                let mut octets = [1, 20, 0, 255];
                octets[place] = octet;
                let ip = std::net::IpAddr::from(octets);
                assert_eq!(ip_text(ip), ip.to_string());
            }
        }
    }

    #[test]
    fn query_strings_never_reach_the_audit_log() {
        let r = RequestInfo {
            path: Some("/reset?token=secret#x".into()),
            referrer: Some("https://app.example.com/a?code=secret".into()),
            ..RequestInfo::default()
        };
        let e = EventRef::new(EventKind::Request, 0).request(&r);
        assert_eq!(e.path, Some("/reset"));
        assert_eq!(e.referrer, Some("https://app.example.com/a"));
        assert_eq!(Event::from(e).ts, "1970-01-01T00:00:00.000Z");
    }

    /// The line written field by field is the one serde_json writes, byte for
    /// byte: every field given, none, text holding every ASCII character,
    /// non-ASCII letters, U+2028 and an emoji, and numbers of every shape (zero,
    /// negative zero, the smallest subnormal, the infinities, large and small).
    #[test]
    fn the_line_is_the_text_serde_json_writes() {
        let ascii: String = (0_u8..0x80).map(char::from).collect();
        let texts = [
            String::new(),
            "alice".to_owned(),
            ascii.clone(),
            format!("é\u{2028}😀{ascii}\\u0000\"x\""),
            "\\".to_owned(),
            "a\u{1f}\u{7f}b".to_owned(),
        ];
        let reason = |detail: &str| Reason {
            rule: "geo_velocity".into(),
            kind: "impossible_travel".into(),
            points: 40,
            mode: crate::risk::ReasonMode::Shadow,
            detail: detail.into(),
        };
        let full = |t: &str| {
            let mut e =
                Event::from(EventRef::new(EventKind::Revoke, 1_800_000_000_007).session(t, t));
            e.ip = Some(t.to_owned());
            e.user_agent = Some(t.to_owned());
            e.method = Some(Cow::Owned(t.to_owned()));
            e.path = Some(t.to_owned());
            e.referrer = Some(t.to_owned());
            e.origin = Some(t.to_owned());
            e.sec_fetch_site = Some(t.to_owned());
            e.cost = Some(u32::MAX);
            e.decision = Some(Cow::Owned(t.to_owned()));
            e.score = Some(0);
            e.session_risk = Some(12.345_678_9);
            e.reasons = vec![reason(t), reason("")];
            e.rules_hash = Some(Arc::from(t));
            e.country = Some(Arc::from(t));
            e.city = Some(Arc::from(t));
            e.asn = Some(64_512);
            e.latitude = Some(-33.868_8);
            e.longitude = Some(f64::NAN);
            e.radius_km = Some(1e300);
            e.detail = Some(t.to_owned());
            e
        };
        let fingerprint = |t: &str| {
            Arc::new(UaFingerprint::new(
                format!("{t}/x"),
                Some(t.to_owned()),
                t.to_owned(),
                crate::enrich::DeviceClass::Desktop,
            ))
        };
        let mut events = vec![event(EventKind::SessionOpen, -1)];
        for t in &texts {
            let mut shared = full(t);
            shared.ua_fingerprint = Some(UaKey::Shared(fingerprint(t)));
            let mut text = full(t);
            text.ua_fingerprint = Some(UaKey::Text(t.clone()));
            let mut partial = Event::from(EventRef::new(EventKind::Request, 0).decision("allow"));
            partial.city = Some(Arc::from(t.as_str()));
            partial.latitude = Some(0.0);
            events.extend([shared, text, partial]);
        }
        // Numbers of every shape the writers could format differently.
        for (x, n) in [
            (0.0, 0),
            (-0.0, 1),
            (5e-324, 9),
            (f64::INFINITY, 10),
            (f64::NEG_INFINITY, 99),
            (1e16, 100_000),
            (0.1, u32::MAX - 1),
            (-1e-7, 7),
        ] {
            let mut e = event(EventKind::Request, 0);
            (e.cost, e.score, e.asn) = (Some(n), Some(n), Some(n));
            e.session_risk = Some(x);
            e.latitude = Some(x);
            e.longitude = Some(-x);
            e.radius_km = Some(x * 3.0);
            events.push(e);
        }
        for e in &events {
            let mut line = String::new();
            e.write_json(&mut line).unwrap();
            assert_eq!(line, serde_json::to_string(e).unwrap());
        }
    }

    /// The line recorded on the request path (the time from the clock's
    /// milliseconds, the address, the client and the evaluation borrowed) is the
    /// line of the event it reads back as, and the time stored with it is the
    /// time written.
    #[test]
    fn the_recorded_line_is_the_line_of_the_event_it_reads_back_as() {
        let reasons = vec![Reason {
            rule: "rate_ip".into(),
            kind: "rate".into(),
            points: 0,
            mode: crate::risk::ReasonMode::Enforce,
            detail: "over \"quota\"".into(),
        }];
        let evaluation = Evaluation {
            decision: crate::risk::Decision::Deny,
            score: 0,
            session_risk: 7.25,
            reasons,
            user_message: None,
            retry_after: Some(1),
            shadow_decision: crate::risk::Decision::Deny,
            rules_hash: Arc::from("0123456789abcdef"),
        };
        for (ms, ip) in [
            (1_800_000_000_007, "81.2.69.142"),
            (-1, "2001:db8::7"),
            (0, "::ffff:10.0.0.1"),
            // Out of range (the last two): written as the epoch, and stored at it.
            (i64::MAX, "255.255.255.255"),
            (-62_167_219_200_001, "192.0.2.1"),
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let request = RequestInfo {
                ip: Some(ip),
                user_agent: Some("Mozilla/5.0 \"x\"".into()),
                method: Some(Cow::Borrowed("GET")),
                path: Some("/a?token=secret".into()),
                referrer: Some("https://app.example.com/b#frag".into()),
                origin: Some("https://app.example.com".into()),
                sec_fetch_site: Some("same-origin".into()),
                cost: Some(3),
            };
            let client = ClientInfo {
                ip,
                prefix: ipnet::IpNet::from(ip),
                country: Some(Arc::from("GB")),
                location: Some(crate::enrich::Location {
                    country: Some(Arc::from("GB")),
                    city: Some(Arc::from("Lon\"don")),
                    latitude: 51.5142,
                    longitude: -0.0931,
                    radius_km: 10.0,
                }),
                asn: Some(64_512),
                asn_org: None,
                ua: Arc::new(UaFingerprint::new(
                    "Firefox".into(),
                    Some("133".into()),
                    "Linux".into(),
                    crate::enrich::DeviceClass::Desktop,
                )),
            };
            for recorded in [
                EventRef::new(EventKind::Request, ms)
                    .request(&request)
                    .session("s1", "alice")
                    .evaluation(&evaluation)
                    .client(&client),
                // Without a request, the client's address is the event's.
                EventRef::new(EventKind::Revoke, ms)
                    .client(&client)
                    .decision("revoke")
                    .detail(format!("risk: {ms}")),
            ] {
                let mut line = String::new();
                let written = recorded.write_json(&mut line).unwrap();
                let read_back = Event::from(recorded.clone());
                assert_eq!(line, serde_json::to_string(&read_back).unwrap());
                assert!(!line.contains("secret") && !line.contains("frag"), "{line}");
                let row = stored(&recorded).unwrap();
                assert_eq!(row.event, line);
                let expected_ms = if ms == i64::MAX || ms < -62_167_219_200_000 {
                    0
                } else {
                    ms
                };
                assert_eq!(written, Some(expected_ms));
                assert_eq!(row.ts_ms, expected_ms);
                assert_eq!(stored(&read_back.view()).unwrap().ts_ms, expected_ms);
            }
        }
    }

    #[test]
    fn absent_fields_are_left_out_and_read_back_as_absent() {
        let e = Event::from(
            EventRef::new(EventKind::Request, 1_800_000_000_000)
                .session("s1", "alice")
                .decision("allow"),
        );
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"ts":"2027-01-15T08:00:00.000Z","kind":"request","session_id":"s1","subject":"alice","decision":"allow"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
        // Lines written with `null`s (before fields were left out) still read the same.
        let old = r#"{"ts":"2027-01-15T08:00:00.000Z","kind":"request","session_id":"s1","subject":"alice","ip":null,"decision":"allow","reasons":[],"detail":null}"#;
        assert_eq!(serde_json::from_str::<Event>(old).unwrap(), e);
    }

    #[test]
    fn a_shared_fingerprint_is_written_as_its_key_and_read_back_as_text() {
        use crate::enrich::DeviceClass;
        let fp = Arc::new(UaFingerprint::new(
            "Evil \"Bot\"/2".into(),
            None,
            "Linux\\x".into(),
            DeviceClass::Bot,
        ));
        let mut e = event(EventKind::Request, 1_800_000_000_000);
        e.ua_fingerprint = Some(UaKey::Shared(Arc::clone(&fp)));
        let line = serde_json::to_string(&e).unwrap();
        // Escaped as any string would be, and a `/` in a name cannot forge a key.
        assert!(
            line.contains(r#""ua_fingerprint":"Evil \"Bot\"_2/-/Linux\\x/bot""#),
            "{line}"
        );
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(
            back.ua_fingerprint,
            Some(UaKey::Text(r#"Evil "Bot"_2/-/Linux\x/bot"#.into()))
        );
        assert_eq!(back, e);
        assert_eq!(stored(&e.view()).unwrap().event, line);
    }

    #[test]
    fn timestamps_carry_their_own_milliseconds_across_seconds() {
        assert_eq!(rfc3339_ms(1_800_000_000_007), "2027-01-15T08:00:00.007Z");
        assert_eq!(rfc3339_ms(1_800_000_000_999), "2027-01-15T08:00:00.999Z");
        assert_eq!(rfc3339_ms(1_800_000_001_050), "2027-01-15T08:00:01.050Z");
        assert_eq!(rfc3339_ms(1_800_000_000_000), "2027-01-15T08:00:00.000Z");
        // Before 1970 the second rounds down and the milliseconds stay positive.
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        // Back to a second formatted before, after another one was cached.
        assert_eq!(rfc3339_ms(1_800_000_000_007), "2027-01-15T08:00:00.007Z");
        assert_eq!(
            rfc3339_ms(i64::MAX),
            "1970-01-01T00:00:00.000Z",
            "out of range"
        );
        // The first millisecond RFC 3339 can write, and the one before it.
        assert_eq!(rfc3339_ms(-62_167_219_200_000), "0000-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_ms(-62_167_219_200_001),
            "1970-01-01T00:00:00.000Z",
            "a year before 0"
        );
    }

    #[test]
    fn stored_times_read_the_milliseconds_of_every_shape() {
        for ms in [
            1_800_000_000_007,
            1_800_000_000_999,
            1_800_000_001_050,
            1_800_000_000_000,
            -1,
            -1_000,
            0,
            -62_167_219_200_000,
        ] {
            let e = EventRef::new(EventKind::Request, ms);
            let read_back = Event::from(e.clone());
            assert_eq!(stored(&e).map(|s| s.ts_ms), Some(ms), "{}", read_back.ts);
            // The same time, read from the line's text.
            assert_eq!(
                stored(&read_back.view()).map(|s| s.ts_ms),
                Some(ms),
                "{}",
                read_back.ts
            );
        }
        // Back to a second read before, after another one was cached.
        assert_eq!(
            parse_ms("2027-01-15T08:00:00.007Z"),
            Some(1_800_000_000_007)
        );
        // Other RFC 3339 shapes (a replayed or hand-written log) are parsed in full.
        assert_eq!(
            parse_ms("2027-01-15T09:00:00.007+01:00"),
            Some(1_800_000_000_007)
        );
        assert_eq!(parse_ms("2027-01-15T08:00:00Z"), Some(1_800_000_000_000));
        assert_eq!(
            parse_ms("2027-01-15T08:00:00.0071Z"),
            Some(1_800_000_000_007)
        );
        assert_eq!(parse_ms("2027-01-15T08:00:00.00aZ"), None);
        assert_eq!(parse_ms("2027-13-15T08:00:00.007Z"), None, "month 13");
        assert_eq!(parse_ms("not a time"), None);
    }

    #[test]
    fn a_full_queue_drops_and_counts_while_live_watchers_still_see_each_event() {
        let (sink, _rx) = EventSink::new(2, None);
        for n in 0..5 {
            sink.record(EventRef::new(EventKind::Request, n));
        }
        assert_eq!(sink.dropped_queue_full(), 3);
        assert_eq!(sink.depth(), 2, "two queued, none stored");
        let mut live = sink.subscribe();
        sink.record(EventRef::new(EventKind::Request, 5).decision("deny"));
        assert_eq!(sink.dropped_queue_full(), 4);
        let line = live.try_recv().expect("the watcher saw the dropped event");
        assert!(line.contains(r#""decision":"deny""#), "{line}");
    }

    #[test]
    fn the_writer_is_woken_once_half_a_batch_waits_not_at_every_event() {
        use futures_util::FutureExt;
        let (sink, _rx) = EventSink::new(8, None);
        let woken = |sink: &EventSink| sink.filling.notified().now_or_never().is_some();
        for n in 1..=3 {
            sink.record(EventRef::new(EventKind::Request, n));
            assert!(!woken(&sink), "{n} of a batch of 8 queued");
        }
        sink.record(EventRef::new(EventKind::Request, 4));
        assert!(woken(&sink), "half a batch queued");
        assert!(!woken(&sink), "one wake-up per signal");
        sink.record(EventRef::new(EventKind::Request, 5));
        assert!(woken(&sink), "still more than half a batch queued");
    }

    /// On the paused clock: a full batch is stored at once, because `record` wakes
    /// the sleeping writer; a batch short of full waits for its deadline.
    #[tokio::test]
    async fn a_full_batch_is_stored_at_once_and_a_partial_one_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("events.db").display());
        let store = crate::store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        // Paused once connected: opening the pool waits on threads of its own.
        tokio::time::pause();
        let (sink, rx) = EventSink::new(8, None);
        tokio::spawn(sink.clone().run_writer(rx, store));
        let stored_after = |n: u64| {
            let sink = sink.clone();
            async move {
                let start = tokio::time::Instant::now();
                // Each pause lets the paused clock move on by a millisecond, unless the
                // writer's database call is running (that holds the clock).
                while sink.written() < n {
                    assert!(start.elapsed() < LINGER * 10, "{n} events never stored");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                start.elapsed()
            }
        };
        // The writer takes the first event and goes to sleep on its batch's deadline;
        // the batch fills while it sleeps.
        sink.record(EventRef::new(EventKind::Request, 0));
        for _ in 0..1_000 {
            if sink.tx.capacity() == sink.capacity {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            sink.tx.capacity(),
            sink.capacity,
            "the writer took the first event"
        );
        for i in 1..8 {
            sink.record(EventRef::new(EventKind::Request, i));
        }
        let waited = stored_after(8).await;
        assert!(waited < LINGER / 4, "a full batch waited {waited:?}");
        for i in 0..3 {
            sink.record(EventRef::new(EventKind::Request, i));
        }
        let waited = stored_after(11).await;
        assert!(
            waited >= LINGER - Duration::from_millis(2),
            "a partial batch is stored at its deadline, not before: {waited:?}"
        );
    }

    #[test]
    fn a_nul_character_is_stored_as_a_replacement_character() {
        let e = EventRef::new(EventKind::Request, 0).session("s\0", "al\0ice");
        let s = stored(&e).expect("storable");
        assert_eq!(s.subject.as_deref(), Some("al\u{fffd}ice"));
        assert_eq!(s.session_id.as_deref(), Some("s\u{fffd}"));
        assert!(!s.event.contains("\\u0000") && s.event.contains("al\\ufffdice"));
        // The engine's words are borrowed; other text is copied, cleaned.
        for decision in [
            "allow",
            "step_up",
            "deny",
            "revoke",
            "revoke_user",
            "invalid",
        ] {
            let s = stored(&EventRef::new(EventKind::Request, 0).decision(decision)).unwrap();
            assert!(matches!(s.decision, Some(Cow::Borrowed(d)) if d == decision));
        }
        let s = stored(&EventRef::new(EventKind::Request, 0).decision("de\0ny")).unwrap();
        assert!(matches!(s.decision, Some(Cow::Owned(d)) if d == "de\u{fffd}ny"));
    }

    /// The word-wise check agrees with the byte-wise definition for every byte
    /// value at every place of every length it treats apart (below 4, 4 to 7, 8 to
    /// 31, 32 and up), the bytes around it being the ones nearest to qualifying.
    #[test]
    fn the_escape_check_finds_every_byte_to_escape_in_every_place() {
        let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        for len in 1..=40 {
            for filler in [b' ', b'!', b'#', b'[', b']', 0x80, 0xa2, 0xdc, 0xff] {
                for at in 0..len {
                    for b in 0..=u8::MAX {
                        let mut bytes = vec![filler; len];
                        bytes[at] = b;
                        assert_eq!(
                            needs_escape(&bytes),
                            escaped(b),
                            "byte {b:#04x} at {at} of {len} among {filler:#04x}"
                        );
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    #[test]
    fn text_that_only_looks_like_an_escaped_nul_is_kept() {
        // The subject is a backslash and `u0000`, with a real NUL after it.
        let e = EventRef::new(EventKind::Request, 0).session("s", "\\u0000\0é\\");
        let s = stored(&e).expect("storable");
        let line: serde_json::Value = serde_json::from_str(&s.event).unwrap();
        assert_eq!(line["subject"], "\\u0000\u{fffd}é\\");
        assert_eq!(s.subject.as_deref(), Some("\\u0000\u{fffd}é\\"));
        assert_eq!(
            without_nul_escapes(r#"\\\u0000\"\u00e9"#),
            r#"\\\ufffd\"\u00e9"#
        );
    }
}
