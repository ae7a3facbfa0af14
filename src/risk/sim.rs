//! An offline run of the engine over a sequence of session events, with its own
//! in-memory state and a manual clock set to each event's time: what rule test
//! cases, replay and explain are built on. Same engine, same state rules as the
//! live service; no store, no wall clock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::state::{SessionState, UserState, assess};
use super::{Decision, Evaluation, RateLimiters, RequestContext, RequestKind, RuleSet};
use crate::clock::ManualClock;
use crate::enrich::ClientInfo;

/// The request fields beyond the client.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFields<'a> {
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub referrer: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub sec_fetch_site: Option<&'a str>,
    pub cost: Option<u32>,
}

/// What scoring one request gave.
#[derive(Debug, Clone)]
pub enum Scored {
    Evaluated(Evaluation),
    /// The session was revoked earlier in the run: refused without evaluation.
    Revoked,
    /// No `session_open` for this session was seen: it cannot be scored.
    UnknownSession,
}

impl Scored {
    pub fn decision(&self) -> Option<Decision> {
        match self {
            Self::Evaluated(e) => Some(e.decision),
            Self::Revoked => Some(Decision::Revoke),
            Self::UnknownSession => None,
        }
    }
}

pub struct Simulator {
    rules: RuleSet,
    clock: Arc<ManualClock>,
    limiters: RateLimiters,
    sessions: HashMap<String, SessionState>,
    users: HashMap<String, UserState>,
    revoked: HashSet<String>,
}

impl Simulator {
    pub fn new(rules: RuleSet) -> Self {
        let clock = Arc::new(ManualClock::at(0));
        Self {
            rules,
            limiters: RateLimiters::new(clock.clone(), 1_000_000),
            clock,
            sessions: HashMap::new(),
            users: HashMap::new(),
            revoked: HashSet::new(),
        }
    }

    /// A session's state as the run has it (for explain).
    pub fn session(&self, session: &str) -> Option<&SessionState> {
        self.sessions.get(session)
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    fn at(&self, at_ms: i64) {
        self.clock.set_millis(at_ms);
    }

    pub fn open(&mut self, at_ms: i64, session: &str, subject: &str, client: ClientInfo) {
        self.at(at_ms);
        let state = SessionState::opened(subject, client, at_ms);
        self.users
            .entry(subject.to_owned())
            .or_default()
            .signed_in(&state);
        self.revoked.remove(session);
        self.sessions.insert(session.to_owned(), state);
    }

    pub fn reauth(&mut self, at_ms: i64, session: &str, subject: &str, client: ClientInfo) {
        self.at(at_ms);
        let state = self
            .sessions
            .entry(session.to_owned())
            .or_insert_with(|| SessionState::new(subject, None));
        state.rebind(client, at_ms);
        self.users
            .entry(subject.to_owned())
            .or_default()
            .signed_in(state);
        self.revoked.remove(session);
    }

    pub fn revoke(&mut self, session: &str) {
        self.revoked.insert(session.to_owned());
    }

    pub fn revoke_user(&mut self, subject: &str) {
        let ids: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| &*s.subject == subject)
            .map(|(k, _)| k.clone())
            .collect();
        self.revoked.extend(ids);
    }

    /// Scores a request or refresh and applies its decision to the run's state.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        at_ms: i64,
        kind: RequestKind,
        session: &str,
        subject: &str,
        client: &Arc<ClientInfo>,
        fields: RequestFields<'_>,
        refresh_reused: bool,
    ) -> Scored {
        if self.revoked.contains(session) {
            return Scored::Revoked;
        }
        self.at(at_ms);
        let Some(state) = self.sessions.get_mut(session) else {
            return Scored::UnknownSession;
        };
        let user = self.users.entry(subject.to_owned()).or_default();
        let ctx = RequestContext {
            kind,
            at_ms,
            client,
            method: fields.method,
            path: fields.path,
            referrer: fields.referrer,
            origin: fields.origin,
            sec_fetch_site: fields.sec_fetch_site,
            cost: fields.cost.unwrap_or(1).max(1),
            jti: if kind == RequestKind::Request {
                session
            } else {
                ""
            },
            sid: session,
            sub: subject,
            refresh_reused,
        };
        let e = assess(&self.rules, &self.limiters, &ctx, state, user);
        match e.decision {
            Decision::Revoke => self.revoke(session),
            Decision::RevokeUser => self.revoke_user(subject),
            _ => {}
        }
        Scored::Evaluated(e)
    }
}
