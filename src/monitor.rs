//! The live side of the risk engine: the active rule set (swapped atomically on
//! reload), enrichment, rate limiters and the in-memory state of every session
//! and user it has seen. It decides; the session service makes decisions durable.

use std::borrow::Cow;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;

use crate::ConcurrentMap;
use crate::clock::SharedClock;
use crate::enrich::{ClientInfo, Enricher};
use crate::risk::Observation;
use crate::risk::state::{SessionState, UserState, assess};
use crate::risk::{Evaluation, RateLimiters, RequestContext, RequestKind, RuleError, RuleSet};
use crate::store::{LastSeen, STATE_STEP_UP, SessionRecord};

/// The rule set used when no rule file is configured.
pub const DEFAULT_RULES: &str = include_str!("../rules/default.toml");

/// Sessions whose last sighting only moved on in time (same address and browser,
/// no new risk) are written behind together this often; any other change is
/// written at the next write-behind (about a second).
pub const LAST_SEEN_HEARTBEAT_MS: i64 = 60_000;

/// Keys one rate limiter holds before it prunes idle ones (looked at every
/// [`crate::risk::rate::CAP_CHECK_EVERY`] checks, so up to that many more).
const RATE_KEYS_MAX: usize = 100_000;

/// What the request looked like, beyond the token.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// The standard methods are borrowed (see [`method_name`]).
    pub method: Option<Cow<'static, str>>,
    pub path: Option<String>,
    pub referrer: Option<String>,
    pub origin: Option<String>,
    pub sec_fetch_site: Option<String>,
    pub cost: Option<u32>,
}

/// A request method as the engine and the audit event keep it: one of the
/// standard methods (RFC 9110, and PATCH) is borrowed, any other kept as given.
pub fn method_name(method: impl AsRef<str> + Into<String>) -> Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    match STANDARD.iter().find(|m| **m == method.as_ref()) {
        Some(m) => Cow::Borrowed(m),
        None => Cow::Owned(method.into()),
    }
}

/// Where the active rules came from, for `/readyz` and reload messages.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RulesStatus {
    pub source: String,
    pub hash: String,
    pub rules: usize,
    pub last_error: Option<String>,
}

/// The engine's answer for one request, with the enriched client it saw.
#[derive(Debug, Clone)]
pub struct Assessment {
    pub evaluation: Evaluation,
    /// Shared with the session's recent requests.
    pub client: Arc<ClientInfo>,
    /// This request put the session into step-up (persist it once).
    pub newly_stepped_up: bool,
}

/// A user's state, shared by the user's sessions in memory.
type SharedUser = Arc<Mutex<UserState>>;

fn lock(user: &Mutex<UserState>) -> MutexGuard<'_, UserState> {
    // A panic while it was held leaves a history that is still usable.
    user.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A session's state in memory, holding its user's: a request reaches both with
/// one map lookup.
struct LiveSession {
    state: SessionState,
    user: SharedUser,
}

impl std::ops::Deref for LiveSession {
    type Target = SessionState;
    fn deref(&self) -> &SessionState {
        &self.state
    }
}

impl std::ops::DerefMut for LiveSession {
    fn deref_mut(&mut self) -> &mut SessionState {
        &mut self.state
    }
}

pub struct Monitor {
    rules: ArcSwap<RuleSet>,
    rules_path: Option<PathBuf>,
    last_error: ArcSwap<Option<String>>,
    enricher: Arc<Enricher>,
    limiters: RateLimiters,
    /// Boxed: a map's slots are mostly empty at any size, so an empty slot costs a
    /// pointer, not a whole state.
    sessions: ConcurrentMap<String, Box<LiveSession>>,
    /// Each user with a session in memory; the sessions hold the same state.
    users: ConcurrentMap<Arc<str>, SharedUser>,
    /// Sessions whose last sighting changed in a way that matters now (new address
    /// or browser, new risk): written at the next write-behind. Routine sightings
    /// only set the session's `unsaved` flag and wait for the heartbeat.
    dirty: ConcurrentMap<String, ()>,
    /// When the write-behind last swept every session for routine sightings.
    swept_ms: AtomicI64,
    clock: SharedClock,
}

impl Monitor {
    /// Loads the rule file (or the built-in default rules when none is configured).
    pub fn new(
        rules_path: Option<PathBuf>,
        enricher: Arc<Enricher>,
        clock: SharedClock,
    ) -> Result<Self, RuleError> {
        let rules = match &rules_path {
            Some(p) => RuleSet::load(p)?,
            None => RuleSet::parse("(built-in rules/default.toml)", DEFAULT_RULES)?,
        };
        Ok(Self {
            rules: ArcSwap::from_pointee(rules),
            rules_path,
            last_error: ArcSwap::from_pointee(None),
            enricher,
            limiters: RateLimiters::new(clock.clone(), RATE_KEYS_MAX),
            sessions: ConcurrentMap::default(),
            users: ConcurrentMap::default(),
            dirty: ConcurrentMap::default(),
            swept_ms: AtomicI64::new(clock.now_millis()),
            clock,
        })
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    pub fn rules_path(&self) -> Option<&Path> {
        self.rules_path.as_deref()
    }

    /// Re-reads the rule file. An invalid file is refused and the current rules stay.
    pub fn reload_rules(&self) -> Result<Option<String>, RuleError> {
        let Some(path) = &self.rules_path else {
            return Ok(None);
        };
        match RuleSet::load(path) {
            Ok(rules) => {
                let changed = rules.hash != self.rules.load().hash;
                let hash = rules.hash.to_string();
                if changed {
                    self.rules.store(Arc::new(rules));
                }
                self.last_error.store(Arc::new(None));
                Ok(changed.then_some(hash))
            }
            Err(e) => {
                self.last_error.store(Arc::new(Some(e.to_string())));
                Err(e)
            }
        }
    }

    pub fn rules_status(&self) -> RulesStatus {
        let rules = self.rules.load();
        RulesStatus {
            source: rules.source.clone(),
            hash: rules.hash.to_string(),
            rules: rules.rules.len(),
            last_error: (**self.last_error.load()).clone(),
        }
    }

    pub fn enricher(&self) -> &Enricher {
        &self.enricher
    }

    pub fn enrich(&self, ip: IpAddr, user_agent: &str) -> ClientInfo {
        self.enricher.enrich(ip, user_agent)
    }

    /// Whether the session's state is in memory.
    pub fn knows(&self, session_id: &str) -> bool {
        self.sessions.contains_key(session_id)
    }

    /// A new session, bound to the client that opened it.
    pub fn bind(&self, session_id: &str, subject: &str, client: ClientInfo) {
        let at_ms = self.clock.now_millis();
        let mut state = SessionState::opened(subject, client, at_ms);
        let (key, user) = self.user(subject);
        lock(&user).signed_in(&state);
        state.subject = key;
        self.sessions
            .insert(session_id.to_owned(), Box::new(LiveSession { state, user }));
    }

    /// The user's subject as the map holds it, and the user's state, created empty
    /// if there is none.
    fn user(&self, subject: &str) -> (Arc<str>, SharedUser) {
        let entry = match self.users.get(subject) {
            Some(user) => user,
            None => self
                .users
                .entry(Arc::from(subject))
                .or_default()
                .downgrade(),
        };
        (Arc::clone(entry.key()), Arc::clone(entry.value()))
    }

    /// Re-authenticated: new binding, risk and step-up cleared.
    pub fn rebind(&self, session_id: &str, subject: &str, client: ClientInfo) {
        let at_ms = self.clock.now_millis();
        let (key, user) = self.user(subject);
        // Lock order: session, then user (as in `assess`).
        let mut session = self
            .sessions
            .entry(session_id.to_owned())
            .or_insert_with(|| {
                let mut state = SessionState::new(subject, None);
                state.subject = key;
                Box::new(LiveSession { state, user })
            });
        session.rebind(client, at_ms);
        let LiveSession { state, user } = &mut **session;
        lock(user).signed_in(state);
    }

    /// Rebuilds a session's state (and, the first time, its user's history) from the store.
    pub fn load(&self, session: &SessionRecord, user_sessions: Option<&[SessionRecord]>) {
        let parse = |s: &SessionRecord| {
            s.binding_info
                .as_deref()
                .and_then(|b| serde_json::from_str::<ClientInfo>(b).ok())
        };
        let (key, user) = self.user(&session.subject);
        if let Some(all) = user_sessions {
            let mut user = lock(&user);
            for s in all {
                if let Some(b) = parse(s) {
                    user.learn(&b);
                }
            }
        }
        let mut state = match parse(session) {
            // The last sighting we know durably is the sign-in (or re-authentication).
            Some(b) => {
                SessionState::opened(&session.subject, b, session.auth_time.saturating_mul(1000))
            }
            None => SessionState::new(&session.subject, None),
        };
        if let Some(last) = session
            .last_seen_info
            .as_deref()
            .and_then(|l| serde_json::from_str::<Observation>(l).ok())
            .filter(|l| state.recent.back().is_none_or(|b| l.at_ms > b.at_ms))
        {
            // Only requests that were let through are written behind.
            state.allowed(last);
        }
        state.risk = session.risk;
        state.risk_at_ms = session.risk_at;
        state.step_up = session.state == STATE_STEP_UP;
        state.user_generation = session.user_generation;
        state.access_exp_max = session.access_exp_max;
        if state.step_up {
            state.step_up_message = session.step_up_message.as_deref().map(Box::from);
        }
        state.subject = key;
        self.sessions
            .entry(session.session_id.clone())
            .or_insert(Box::new(LiveSession { state, user }));
    }

    /// The user's generation recorded with the session, and the latest access-token
    /// expiry the store knows for it, if the session is in memory.
    pub fn recorded(&self, session_id: &str) -> Option<(i64, i64)> {
        self.sessions
            .get(session_id)
            .map(|s| (s.user_generation, s.access_exp_max))
    }

    /// The store now knows `exp` as the session's latest access-token expiry.
    pub fn raised_access_exp(&self, session_id: &str, exp: i64) {
        if let Some(mut s) = self.sessions.get_mut(session_id) {
            s.access_exp_max = s.access_exp_max.max(exp);
        }
    }

    pub fn knows_user(&self, subject: &str) -> bool {
        self.users.contains_key(subject)
    }

    /// A step-up that could not be made durable is not kept in memory either, so the
    /// next request tries again.
    pub fn clear_step_up(&self, session_id: &str) {
        if let Some(mut s) = self.sessions.get_mut(session_id) {
            s.step_up = false;
            s.step_up_message = None;
        }
    }

    /// Marks sessions whose last observation still has to be written (at the next
    /// write-behind).
    pub fn mark_dirty(&self, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            self.dirty.insert(id, ());
        }
    }

    pub fn forget(&self, session_id: &str) {
        self.sessions.remove(session_id);
    }

    /// Drops every cached session state; each is reloaded from the store when next seen.
    pub fn forget_all(&self) {
        self.sessions.clear();
    }

    /// Another node put this session into step-up.
    pub fn mark_step_up(&self, session_id: &str, message: Option<String>) {
        if let Some(mut s) = self.sessions.get_mut(session_id) {
            s.step_up = true;
            if let Some(message) = message {
                s.step_up_message = Some(message.into_boxed_str());
            }
        }
    }

    /// Scores one request of a known session. `None` if the session's state is not loaded.
    pub fn assess(
        &self,
        kind: RequestKind,
        ids: (&str, &str, &str),
        request: &RequestInfo,
        refresh_reused: bool,
    ) -> Option<Assessment> {
        let (jti, session_id, subject) = ids;
        let rules = self.rules.load();
        // The user-agent regexes (on a cache miss) run before any lock.
        let fingerprint = request
            .user_agent
            .as_deref()
            .map(|ua| self.enricher.ua_fingerprint(ua));
        let ip = request.ip.map(|ip| ip.to_canonical());
        let generation = self.enricher.geoip().generation();
        // The same address and browser as the session's previous request, enriched
        // by the same GeoIP databases: that enrichment stands (the common case, and
        // no lookup or allocation).
        let reusable = |s: &SessionState| {
            let (ip, fingerprint) = (ip?, fingerprint.as_ref()?);
            let last = s.recent.back()?;
            (s.enriched_by == Some(generation)
                && last.client.ip == ip
                && *fingerprint == last.client.ua)
                .then(|| Arc::clone(&last.client))
        };
        let mut session = self.sessions.get_mut(session_id)?;
        let client = match (reusable(&session), ip) {
            (Some(client), _) => client,
            (None, Some(ip)) => {
                // The lookup runs outside the session's lock (it may read the
                // memory-mapped database from disk).
                drop(session);
                let geo = self.enricher.geoip().lookup(ip);
                session = self.sessions.get_mut(session_id)?;
                // No User-Agent given is not a different browser: keep the bound one.
                let ua = match (&fingerprint, &session.binding) {
                    (Some(f), _) => Arc::clone(f),
                    (None, Some(b)) => Arc::clone(&b.ua),
                    (None, None) => self.enricher.ua_fingerprint(""),
                };
                Arc::new(self.enricher.client(ip, geo, ua))
            }
            // Without the request's IP, the binding stands in for the network: IP rules
            // cannot fire; a given User-Agent still counts.
            (None, None) => match (&session.binding, &fingerprint) {
                (Some(bound), Some(ua)) => Arc::new(ClientInfo {
                    ua: Arc::clone(ua),
                    ..ClientInfo::clone(bound)
                }),
                (Some(bound), None) => Arc::clone(bound),
                (None, _) => return None,
            },
        };
        // What enriched the observation this request leaves (the newest of `recent`):
        // the databases of this generation, or (without an IP) the binding, whose
        // origin is not known here.
        session.enriched_by = ip.map(|_| generation);
        let ctx = RequestContext {
            kind,
            at_ms: self.clock.now_millis(),
            client: &client,
            method: request.method.as_deref(),
            path: request.path.as_deref(),
            referrer: request.referrer.as_deref(),
            origin: request.origin.as_deref(),
            sec_fetch_site: request.sec_fetch_site.as_deref(),
            cost: request.cost.unwrap_or(1).max(1),
            jti,
            sid: session_id,
            sub: subject,
            refresh_reused,
        };
        let flagged_before = session.step_up;
        let moved = session
            .last_allowed
            .as_ref()
            .is_none_or(|o| o.client.ip != client.ip || o.client.ua != client.ua);
        let evaluation = {
            let LiveSession { state, user } = &mut **session;
            // Lock order: session, then user (everywhere).
            assess(&rules, &self.limiters, &ctx, state, &mut lock(user))
        };
        let material = moved || evaluation.score > 0 || session.step_up != flagged_before;
        session.unsaved = true;
        // Lock order: session, then the dirty set (as in `take_dirty`).
        if material && !self.dirty.contains_key(session_id) {
            self.dirty.insert(session_id.to_owned(), ());
        }
        Some(Assessment {
            newly_stepped_up: session.step_up && !flagged_before,
            evaluation,
            client,
        })
    }

    /// The last sightings to write behind: every session whose sighting changed
    /// materially since the previous call and, once [`LAST_SEEN_HEARTBEAT_MS`] has
    /// passed since the last sweep, every other session scored since it was last
    /// written. `all` takes every unwritten session (at shutdown).
    pub fn take_dirty(&self, all: bool) -> Vec<LastSeen> {
        let now = self.clock.now_millis();
        let mut ids: Vec<String> = self.dirty.iter().map(|e| e.key().clone()).collect();
        let swept = self.swept_ms.load(Ordering::Relaxed);
        // A wall clock stepped back also sweeps (and restarts the heartbeat from now).
        if all || now - swept >= LAST_SEEN_HEARTBEAT_MS || now < swept {
            self.swept_ms.store(now, Ordering::Relaxed);
            ids.extend(
                self.sessions
                    .iter()
                    .filter(|s| s.unsaved && !self.dirty.contains_key(s.key()))
                    .map(|s| s.key().clone()),
            );
        }
        ids.into_iter()
            .filter_map(|id| {
                // Removed before the state is read: a request scored after this
                // marks the session again.
                self.dirty.remove(&id);
                let mut s = self.sessions.get_mut(&id)?;
                s.unsaved = false;
                // The last sure sighting: a refused request must not become the
                // baseline of a node that reloads the session.
                let last = s.last_allowed.as_ref()?;
                Some(LastSeen {
                    at: last.at_ms.div_euclid(1000),
                    observation: serde_json::to_string(last).ok()?,
                    risk: s.risk,
                    risk_at_ms: s.risk_at_ms,
                    session_id: id,
                })
            })
            .collect()
    }

    /// Drops idle rate-limiter keys, and the state of sessions not seen since
    /// `idle_before_ms` (their tokens have expired; a refresh reloads them from the
    /// store) unless their own rate quota has yet to refill, and of users with no
    /// session left in memory. Call periodically.
    pub fn maintain(&self, idle_before_ms: i64) {
        self.limiters.maintain();
        let holds_back = self.limiters.holds_back();
        self.sessions.retain(|id, s| {
            s.unsaved
                || self.dirty.contains_key(id)
                || s.recent.back().is_some_and(|o| o.at_ms >= idle_before_ms)
                // Forgotten now, a long quota would start afresh at its next request.
                || holds_back(&s.quotas)
        });
        // A user is held by the map and by each of its sessions in memory.
        self.users.retain(|_, user| Arc::strong_count(user) > 1);
    }

    pub fn sessions_in_memory(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::clock::{Clock, ManualClock};
    use crate::enrich::{EnrichConfig, UaParser};

    /// A monitor with the default enrichment, on a manual clock at 2027-01-15.
    fn monitor(rules: Option<PathBuf>) -> (Arc<ManualClock>, Monitor) {
        let clock = Arc::new(ManualClock::at(1_800_000_000));
        let enricher =
            Enricher::new(EnrichConfig::default(), Arc::new(UaParser::new().unwrap())).unwrap();
        let monitor = Monitor::new(rules, Arc::new(enricher), clock.clone()).unwrap();
        (clock, monitor)
    }

    #[test]
    fn standard_methods_are_borrowed_and_others_kept_as_given() {
        for m in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ] {
            assert!(matches!(method_name(m), Cow::Borrowed(b) if b == m));
            assert!(matches!(method_name(m.to_owned()), Cow::Borrowed(b) if b == m));
        }
        for m in ["get", "PROPFIND", "", "GET "] {
            assert!(matches!(method_name(m), Cow::Owned(o) if o == m), "{m:?}");
        }
    }

    #[test]
    fn idle_sessions_and_their_users_leave_memory_but_unwritten_ones_stay() {
        let (clock, monitor) = monitor(None);
        let client = monitor.enrich("192.0.2.1".parse().unwrap(), "curl/8");
        monitor.bind("idle", "alice", client.clone());
        monitor.bind("busy", "bob", client);
        clock.advance(std::time::Duration::from_secs(600));
        let request = RequestInfo::default();
        assert!(
            monitor
                .assess(RequestKind::Request, ("j", "busy", "bob"), &request, false)
                .is_some()
        );
        let _ = monitor.take_dirty(true);
        monitor.maintain(clock.now_millis() - 330_000);
        assert!(!monitor.knows("idle") && !monitor.knows_user("alice"));
        assert!(monitor.knows("busy") && monitor.knows_user("bob"));
    }

    #[test]
    fn the_sessions_of_a_user_share_its_state_which_leaves_with_the_last_of_them() {
        let (clock, monitor) = monitor(None);
        let home: IpAddr = "192.0.2.1".parse().unwrap();
        monitor.bind("s1", "alice", monitor.enrich(home, "curl/8"));
        monitor.bind("s2", "alice", monitor.enrich(home, "curl/8"));
        // Re-authenticated after it left memory: it joins the same user.
        monitor.rebind("s3", "alice", monitor.enrich(home, "curl/8"));
        monitor.bind("b1", "bob", monitor.enrich(home, "curl/8"));
        let user_of = |id: &str| Arc::clone(&monitor.sessions.get(id).unwrap().user);
        assert!(Arc::ptr_eq(&user_of("s1"), &user_of("s2")));
        assert!(Arc::ptr_eq(&user_of("s1"), &user_of("s3")));
        assert!(!Arc::ptr_eq(&user_of("s1"), &user_of("b1")));
        // A request of one session is the user's last sighting, seen from the others.
        clock.advance(std::time::Duration::from_secs(5));
        let request = RequestInfo {
            ip: Some("198.51.100.7".parse().unwrap()),
            user_agent: Some("curl/8".into()),
            ..RequestInfo::default()
        };
        monitor
            .assess(RequestKind::Request, ("j", "s1", "alice"), &request, false)
            .expect("in memory");
        let last = lock(&user_of("s2")).last.as_ref().map(|o| o.client.ip);
        assert_eq!(last, Some("198.51.100.7".parse().unwrap()));
        // The user stays while any of its sessions is in memory.
        monitor.forget("s1");
        monitor.forget("s2");
        monitor.maintain(i64::MIN);
        assert!(monitor.knows_user("alice"));
        monitor.forget("s3");
        monitor.maintain(i64::MIN);
        assert!(!monitor.knows_user("alice") && monitor.knows_user("bob"));
    }

    #[test]
    fn an_idle_session_stays_in_memory_until_its_own_quota_has_refilled() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.toml");
        std::fs::write(
            &rules,
            "[[rule]]\nid = \"hourly\"\naction = \"deny\"\n\
             rate = { key = \"sid\", limit = 2, per = \"1h\", burst = 2 }\n",
        )
        .unwrap();
        let (clock, monitor) = monitor(Some(rules));
        let client = monitor.enrich("192.0.2.1".parse().unwrap(), "curl/8");
        monitor.bind("s", "alice", client);
        let request = RequestInfo::default();
        let denied = || {
            monitor
                .assess(RequestKind::Request, ("j", "s", "alice"), &request, false)
                .expect("in memory")
                .evaluation
                .retry_after
                .is_some()
        };
        assert!(!denied() && !denied() && denied(), "two an hour");
        let _ = monitor.take_dirty(true);
        // Idle for ten minutes: past the idle window, not past the quota's hour.
        clock.advance(std::time::Duration::from_secs(600));
        monitor.maintain(clock.now_millis() - 330_000);
        assert!(monitor.knows("s"), "kept while its quota has not refilled");
        assert!(denied(), "the quota did not start afresh");
        let _ = monitor.take_dirty(true);
        clock.advance(std::time::Duration::from_secs(3600));
        monitor.maintain(clock.now_millis() - 330_000);
        assert!(!monitor.knows("s"), "refilled and idle: forgotten");
    }

    #[test]
    fn the_write_behind_sends_moves_at_once_and_routine_sightings_on_the_heartbeat() {
        let (clock, monitor) = monitor(None);
        let home: IpAddr = "192.0.2.1".parse().unwrap();
        monitor.bind("s1", "alice", monitor.enrich(home, "curl/8"));
        let from = |ip: &str| RequestInfo {
            ip: Some(ip.parse().unwrap()),
            user_agent: Some("curl/8".into()),
            ..RequestInfo::default()
        };
        let seen = |request: &RequestInfo| {
            monitor
                .assess(RequestKind::Request, ("j", "s1", "alice"), request, false)
                .expect("loaded");
        };
        let written =
            |all: bool| -> Vec<i64> { monitor.take_dirty(all).iter().map(|l| l.at).collect() };

        clock.advance(std::time::Duration::from_secs(5));
        seen(&from("192.0.2.1"));
        assert!(written(false).is_empty(), "same place, no risk: waits");
        clock.advance(std::time::Duration::from_secs(30));
        seen(&from("192.0.2.1"));
        assert!(written(false).is_empty(), "still within the heartbeat");
        clock.advance(std::time::Duration::from_secs(30));
        assert_eq!(
            written(false),
            [1_800_000_035],
            "the heartbeat writes the latest sighting even without a new request"
        );
        assert!(written(false).is_empty(), "and only once");
        clock.advance(std::time::Duration::from_secs(61));
        assert!(
            written(false).is_empty(),
            "a written session is not written again by the next heartbeat"
        );

        clock.advance(std::time::Duration::from_secs(1));
        seen(&from("198.51.100.9"));
        assert_eq!(
            written(false),
            [1_800_000_127],
            "a new address is written at once"
        );

        clock.advance(std::time::Duration::from_secs(1));
        seen(&from("198.51.100.9"));
        assert!(written(false).is_empty());
        clock.set(1_800_000_100);
        assert_eq!(
            written(false),
            [1_800_000_128],
            "a clock stepped back sweeps rather than stalling the heartbeat"
        );
        clock.set(1_800_000_200);
        seen(&from("198.51.100.9"));
        assert_eq!(written(true), [1_800_000_200], "shutdown writes everything");
    }

    #[test]
    fn a_session_with_an_unwritten_sighting_stays_in_memory_until_written() {
        let (clock, monitor) = monitor(None);
        let home: IpAddr = "192.0.2.1".parse().unwrap();
        monitor.bind("s1", "alice", monitor.enrich(home, "curl/8"));
        let request = RequestInfo {
            ip: Some(home),
            user_agent: Some("curl/8".into()),
            ..RequestInfo::default()
        };
        assert!(
            monitor
                .assess(RequestKind::Request, ("j", "s1", "alice"), &request, false)
                .is_some()
        );
        clock.advance(std::time::Duration::from_secs(30));
        monitor.maintain(clock.now_millis());
        assert!(
            monitor.knows("s1"),
            "its routine sighting is not written yet"
        );
        assert_eq!(monitor.take_dirty(true).len(), 1);
        monitor.maintain(clock.now_millis());
        assert!(!monitor.knows("s1") && !monitor.knows_user("alice"));
    }
}
