//! The token lifecycle: open a session, rotate refresh tokens with reuse
//! detection, re-authenticate, log out one or every session, and verify access
//! tokens against signature, claims and the in-memory revocation view.
//!
//! Order of work in every state change: commit to the store, then apply the
//! change to the view, then answer. A crash in between loses nothing: the view
//! is rebuilt from the store at start.

pub mod input;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::clock::{SharedClock, UnixSeconds};
use crate::config::{TokenSettings, sha256, to_hex};
use crate::events::{EventKind, EventRef, EventSink};
use crate::monitor::{Assessment, Monitor, RequestInfo};
use crate::revocation::{Change, RevocationView, RevokedBy, TokenIds};
use crate::risk::{Decision, Evaluation, RequestKind};
use crate::store::{
    NewRefresh, ReauthRequest, RefreshRejection, RevokedJti, RotateOutcome, RotateRequest,
    STATE_ACTIVE, Seen, SessionRecord, SharedStore, StoreError, session_reauthenticated,
    session_revoked,
};
use crate::token::{AccessClaims, TokenCodec, TokenError, binding_digest, random_bytes};
use input::{AuthContext, Client, Subject};

/// Refresh tokens start with this, so a leaked one is recognisable (e.g. by secret scanners).
pub const REFRESH_PREFIX: &str = "twr_";
const MAX_REFRESH_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the refresh token is not valid ({})", .0.code())]
    InvalidGrant(RefreshRejectionCode),
    #[error("the refresh token was already used: the session is revoked")]
    RefreshReuse,
    #[error("no such session")]
    NotFound,
    #[error("the session is revoked")]
    Revoked,
    #[error("the session must re-authenticate first")]
    StepUpRequired(Box<Evaluation>),
    #[error("too many requests")]
    Denied(Box<Evaluation>),
    #[error("the session was ended by the risk rules")]
    RiskRevoked(Box<Evaluation>),
    #[error("this node cannot vouch for revocations: {0}")]
    Unavailable(String),
    #[error("request.ip is required: this session has no recorded binding to stand in for it")]
    MissingClientIp,
    #[error(
        "this session belongs to another issuer: the user re-authenticates there, and its new token opens a new session"
    )]
    ForeignSession,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a refresh token was refused without raising an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshRejectionCode {
    Malformed,
    Store(RefreshRejection),
}

impl RefreshRejectionCode {
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Store(RefreshRejection::Unknown) => "unknown",
            Self::Store(RefreshRejection::Expired) => "expired",
            Self::Store(RefreshRejection::SessionRevoked) => "session_revoked",
            Self::Store(RefreshRejection::Superseded) => "superseded_by_reauth",
        }
    }
}

/// What the app gets back when a session opens, refreshes or re-authenticates.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenPair {
    pub session_id: String,
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_in: u64,
}

/// The outcome of verifying one access token.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Signature, claims and revocation state are fine; the rules decided.
    Assessed(Arc<AccessClaims>, Box<Evaluation>),
    Revoked(Arc<AccessClaims>, RevokedBy),
    Invalid(TokenError),
}

/// A refresh token as presented, checked for shape before any lookup.
/// The revocation reason recorded when rules end a session: the enforced rules that fired.
fn risk_reason(e: &Evaluation) -> String {
    let rules: Vec<&str> = e
        .reasons
        .iter()
        .filter(|r| r.mode == crate::risk::ReasonMode::Enforce)
        .map(|r| r.rule.as_str())
        .collect();
    let mut reason = format!("risk: {}", rules.join(", "));
    reason.truncate(200);
    reason
}

fn refresh_hash(token: &str) -> Option<String> {
    let body = token.strip_prefix(REFRESH_PREFIX)?;
    if token.len() > MAX_REFRESH_LEN
        || body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    Some(to_hex(&sha256(token.as_bytes())))
}

pub struct SessionService {
    store: SharedStore,
    codec: TokenCodec,
    view: Arc<RevocationView>,
    monitor: Arc<Monitor>,
    clock: SharedClock,
    settings: TokenSettings,
    /// Says why this node must not answer `allow` (a stale change feed), if it must not.
    freshness: std::sync::OnceLock<Arc<dyn Fn() -> Option<String> + Send + Sync>>,
    events: std::sync::OnceLock<Arc<EventSink>>,
}

impl SessionService {
    /// Builds the service and fills the revocation view from the store.
    pub async fn start(
        store: SharedStore,
        codec: TokenCodec,
        monitor: Arc<Monitor>,
        clock: SharedClock,
        settings: TokenSettings,
    ) -> Result<Self, StoreError> {
        let view = Arc::new(RevocationView::new());
        let now = clock.now();
        for change in store.revocations(now - codec.leeway()).await? {
            view.apply(change);
        }
        Ok(Self {
            store,
            codec,
            view,
            monitor,
            clock,
            settings,
            freshness: std::sync::OnceLock::new(),
            events: std::sync::OnceLock::new(),
        })
    }

    pub fn codec(&self) -> &TokenCodec {
        &self.codec
    }
    pub fn view(&self) -> &Arc<RevocationView> {
        &self.view
    }
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }
    pub fn store(&self) -> &SharedStore {
        &self.store
    }
    pub fn now(&self) -> UnixSeconds {
        self.clock.now()
    }

    fn access_ttl(&self) -> i64 {
        i64::try_from(self.settings.access_ttl.as_secs()).unwrap_or(i64::MAX)
    }
    fn refresh_ttl(&self) -> i64 {
        i64::try_from(self.settings.refresh_ttl.as_secs()).unwrap_or(i64::MAX)
    }

    fn new_refresh(&self, now: UnixSeconds) -> Result<(String, NewRefresh), SessionError> {
        let raw = random_bytes::<32>().map_err(|_| TokenError::Signing)?;
        let token = format!("{REFRESH_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
        let record = NewRefresh {
            token_hash: to_hex(&sha256(token.as_bytes())),
            issued_at: now,
            expires_at: now.saturating_add(self.refresh_ttl()),
        };
        Ok((token, record))
    }

    fn mint_for(
        &self,
        s: &SessionRecord,
        now: UnixSeconds,
        exp: UnixSeconds,
    ) -> Result<String, SessionError> {
        let extra = s
            .claims
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or_default();
        let amr = s.amr.as_deref().and_then(|a| serde_json::from_str(a).ok());
        let jti = URL_SAFE_NO_PAD.encode(random_bytes::<16>().map_err(|_| TokenError::Signing)?);
        let claims = AccessClaims {
            iss: self.codec.issuer().to_owned(),
            aud: self.codec.audience().to_owned(),
            sub: s.subject.clone(),
            jti,
            sid: s.session_id.clone(),
            iat: now,
            nbf: None,
            exp,
            auth_time: s.auth_time,
            bnd: s.binding.clone(),
            generation: s.user_generation,
            epoch: s.epoch,
            acr: s.acr.clone(),
            amr,
            extra,
            foreign: false,
            cleared: Default::default(),
        };
        Ok(self.codec.mint(&claims)?)
    }

    fn pair(&self, s: &SessionRecord, access: String, refresh: String) -> TokenPair {
        TokenPair {
            session_id: s.session_id.clone(),
            access_token: access,
            token_type: "Bearer",
            expires_in: self.settings.access_ttl.as_secs(),
            refresh_token: refresh,
            refresh_expires_in: self.settings.refresh_ttl.as_secs(),
        }
    }

    /// Opens a session for a user the app has just authenticated.
    pub async fn open(
        &self,
        subject: &Subject,
        client: &Client,
        auth: &AuthContext,
    ) -> Result<TokenPair, SessionError> {
        let now = self.clock.now();
        let exp = now.saturating_add(self.access_ttl());
        let generation = self.store.user_generation(subject.as_str()).await?;
        let ip = client.ip.to_string();
        let info = self.monitor.enrich(client.ip, &client.user_agent);
        let session = SessionRecord {
            session_id: uuid::Uuid::new_v4().to_string(),
            subject: subject.as_str().to_owned(),
            created_at: now,
            last_seen_at: now,
            auth_time: now,
            binding: binding_digest(&info.binding_text()),
            ip,
            user_agent: client.user_agent.clone(),
            acr: auth.acr.clone(),
            amr: auth
                .amr
                .as_ref()
                .and_then(|a| serde_json::to_string(a).ok()),
            claims: auth
                .claims
                .as_ref()
                .and_then(|c| serde_json::to_string(c).ok()),
            state: STATE_ACTIVE.to_owned(),
            revoked_at: None,
            revoked_reason: None,
            epoch: 0,
            epoch_until: 0,
            user_generation: generation,
            access_exp_max: exp,
            binding_info: serde_json::to_string(&info).ok(),
            risk: 0.0,
            risk_at: self.clock.now_millis(),
            last_seen_info: None,
            step_up_message: None,
        };
        let (refresh, record) = self.new_refresh(now)?;
        let access = self.mint_for(&session, now, exp)?;
        self.store.create_session(&session, &record).await?;
        self.emit_sign_in(EventKind::SessionOpen, &session, client, &info);
        self.monitor
            .bind(&session.session_id, &session.subject, info);
        Ok(self.pair(&session, access, refresh))
    }

    /// Rotates a refresh token. A token that was already rotated (outside the grace window
    /// for the immediate predecessor) revokes the whole session.
    pub async fn refresh(
        &self,
        refresh_token: &str,
        client: &Client,
    ) -> Result<TokenPair, SessionError> {
        let presented_hash = refresh_hash(refresh_token)
            .ok_or(SessionError::InvalidGrant(RefreshRejectionCode::Malformed))?;
        let request_info = client.request_info();
        // Score a current token before rotating it: a refused refresh must leave it usable
        // (a rotated token that never reached the client would look like theft later).
        let current = self.store.refresh_token(&presented_hash).await?;
        // Also the immediate predecessor a grace-window retry presents: it gets a token too.
        if let Some(record) = current
            .as_ref()
            .filter(|r| r.retired_at.is_none() || r.retired_reason.as_deref() == Some("rotated"))
            && let Some(session) = self.store.session(&record.session_id).await?
            && !session.is_revoked()
            && self
                .ensure_loaded(&session.session_id, &session.subject)
                .await?
            && let Some(a) = self.monitor.assess(
                RequestKind::Refresh,
                ("", &session.session_id, &session.subject),
                &request_info,
                false,
            )
        {
            self.enforce(&a, &session.session_id, &session.subject)
                .await?;
            self.emit(
                self.event(EventKind::Refresh)
                    .session(&session.session_id, &session.subject)
                    .request(&request_info)
                    .client(&a.client)
                    .evaluation(&a.evaluation),
            );
            match a.evaluation.decision {
                Decision::Allow => {}
                Decision::Deny => return Err(SessionError::Denied(Box::new(a.evaluation))),
                Decision::StepUp => {
                    return Err(SessionError::StepUpRequired(Box::new(a.evaluation)));
                }
                _ => return Err(SessionError::RiskRevoked(Box::new(a.evaluation))),
            }
        }

        let now = self.clock.now();
        let exp = now.saturating_add(self.access_ttl());
        let (refresh, next) = self.new_refresh(now)?;
        let request = RotateRequest {
            presented_hash,
            next,
            grace_secs: i64::try_from(self.settings.refresh_reuse_grace.as_secs()).unwrap_or(0),
            seen: Seen {
                at: now,
                ip: client.ip.to_string(),
                user_agent: client.user_agent.clone(),
            },
            access_exp: exp,
        };
        match self.store.rotate_refresh(&request).await? {
            RotateOutcome::Rotated(session) => {
                let access = self.mint_for(&session, now, exp)?;
                Ok(self.pair(&session, access, refresh))
            }
            RotateOutcome::Reused(session) => {
                tracing::warn!(
                    session_id = %session.session_id,
                    subject = %session.subject,
                    "refresh token reuse: session revoked"
                );
                self.view.apply(session_revoked(&session));
                self.emit(
                    self.event(EventKind::Revoke)
                        .session(&session.session_id, &session.subject)
                        .request(&request_info)
                        .decision("revoke")
                        .detail("refresh_reuse"),
                );
                // The rules may widen the revocation (e.g. to every session of the user).
                if self
                    .ensure_loaded(&session.session_id, &session.subject)
                    .await?
                    && let Some(a) = self.monitor.assess(
                        RequestKind::Refresh,
                        ("", &session.session_id, &session.subject),
                        &request_info,
                        true,
                    )
                    && a.evaluation.decision == Decision::RevokeUser
                {
                    self.enforce(&a, &session.session_id, &session.subject)
                        .await?;
                }
                self.monitor.forget(&session.session_id);
                Err(SessionError::RefreshReuse)
            }
            RotateOutcome::Rejected(why) => {
                let code = RefreshRejectionCode::Store(why);
                let mut event = self
                    .event(EventKind::Refresh)
                    .request(&request_info)
                    .decision("invalid")
                    .detail(code.code());
                event.session_id = current.as_ref().map(|r| r.session_id.as_str());
                self.emit(event);
                Err(SessionError::InvalidGrant(code))
            }
        }
    }

    /// The user proved who they are again: new tokens, new binding, and every
    /// access and refresh token the session had before is dead.
    pub async fn reauth(
        &self,
        session_id: &str,
        client: &Client,
    ) -> Result<TokenPair, SessionError> {
        if self
            .store
            .session(session_id)
            .await?
            .is_some_and(|s| s.foreign_issuer().is_some())
        {
            return Err(SessionError::ForeignSession);
        }
        let now = self.clock.now();
        let exp = now.saturating_add(self.access_ttl());
        let (refresh, next) = self.new_refresh(now)?;
        let ip = client.ip.to_string();
        let info = self.monitor.enrich(client.ip, &client.user_agent);
        let request = ReauthRequest {
            session_id: session_id.to_owned(),
            binding: binding_digest(&info.binding_text()),
            binding_info: serde_json::to_string(&info).ok(),
            seen: Seen {
                at: now,
                ip,
                user_agent: client.user_agent.clone(),
            },
            next,
            access_exp: exp,
        };
        let Some(session) = self.store.reauth(&request).await? else {
            return match self.store.session(session_id).await? {
                Some(_) => Err(SessionError::Revoked),
                None => Err(SessionError::NotFound),
            };
        };
        self.view.apply(session_reauthenticated(&session));
        self.emit_sign_in(EventKind::Reauth, &session, client, &info);
        self.monitor
            .rebind(&session.session_id, &session.subject, info);
        let access = self.mint_for(&session, now, exp)?;
        Ok(self.pair(&session, access, refresh))
    }

    /// One session, as stored.
    pub async fn get(&self, session_id: &str) -> Result<Option<SessionRecord>, SessionError> {
        Ok(self.store.session(session_id).await?)
    }

    pub async fn list(&self, subject: &Subject) -> Result<Vec<SessionRecord>, SessionError> {
        Ok(self.store.sessions_of(subject.as_str()).await?)
    }

    /// Logs out one session (idempotent).
    pub async fn logout(&self, session_id: &str, reason: &str) -> Result<(), SessionError> {
        let session = self
            .store
            .revoke_session(session_id, reason, self.clock.now())
            .await?
            .ok_or(SessionError::NotFound)?;
        self.view.apply(session_revoked(&session));
        self.monitor.forget(&session.session_id);
        self.emit(
            self.event(EventKind::Revoke)
                .session(&session.session_id, &session.subject)
                .decision("revoke")
                .detail(reason),
        );
        Ok(())
    }

    /// Logs the user out everywhere: every session revoked, every older token dead.
    pub async fn logout_all(&self, subject: &Subject) -> Result<u64, SessionError> {
        self.logout_all_because(subject, "logout_all").await
    }

    /// Revokes every session of the subject, recording why (`logout_all`, `risk: …`).
    async fn logout_all_because(
        &self,
        subject: &Subject,
        reason: &str,
    ) -> Result<u64, SessionError> {
        let now = self.clock.now();
        let until = now.saturating_add(self.access_ttl());
        let (revoked, generation, until) =
            self.store.revoke_user(subject.as_str(), now, until).await?;
        self.view.apply(Change::UserGeneration {
            subject: subject.as_str().to_owned(),
            generation,
            until,
        });
        let mut event = self
            .event(EventKind::Revoke)
            .decision("revoke_user")
            .detail(format!("{reason} ({revoked} sessions)"));
        event.subject = Some(subject.as_str());
        self.emit(event);
        Ok(revoked)
    }

    /// Signature, claims and revocation state only; no database, no rules.
    pub fn check_token(&self, token: &str) -> Result<Arc<AccessClaims>, Verdict> {
        let claims = self
            .codec
            .verify(token, self.clock.now())
            .map_err(Verdict::Invalid)?;
        let ids = TokenIds {
            jti: &claims.jti,
            session_id: &claims.sid,
            subject: &claims.sub,
            generation: claims.generation,
            epoch: claims.epoch,
        };
        match self.view.check_remembered(ids, &claims.cleared) {
            Some(by) => Err(Verdict::Revoked(claims, by)),
            None => Ok(claims),
        }
    }

    /// Loads the session's risk state from the store if it is not in memory.
    /// `false` when the store has no such session.
    async fn ensure_loaded(&self, session_id: &str, subject: &str) -> Result<bool, SessionError> {
        if self.monitor.knows(session_id) {
            return Ok(true);
        }
        let Some(record) = self.store.session(session_id).await? else {
            return Ok(false);
        };
        let user_sessions = if self.monitor.knows_user(subject) {
            None
        } else {
            Some(self.store.sessions_of(subject).await?)
        };
        self.monitor.load(&record, user_sessions.as_deref());
        Ok(true)
    }

    /// Another issuer's token: its session is created and bound to this client at its
    /// first sighting (on any node: the id is derived from the issuer's own ids), then
    /// checked against "log out everywhere" with the generation recorded then. A
    /// session loaded from the store that was revoked stays revoked, whatever the
    /// revocation view has pruned, and the store learns each later `exp` the issuer
    /// mints for it, so revocations always cover every token we accepted.
    async fn sight_foreign(
        &self,
        claims: &AccessClaims,
        request: &RequestInfo,
    ) -> Result<Option<RevokedBy>, SessionError> {
        if !self.monitor.knows(&claims.sid) {
            match self.store.session(&claims.sid).await? {
                Some(record) if record.is_revoked() => return Ok(Some(RevokedBy::Session)),
                Some(_) => {}
                None => self.open_foreign(claims, request).await?,
            }
            if !self.ensure_loaded(&claims.sid, &claims.sub).await? {
                return Ok(Some(RevokedBy::Session));
            }
        }
        let Some((generation, exp_max)) = self.monitor.recorded(&claims.sid) else {
            return Ok(Some(RevokedBy::Session));
        };
        // A plain check, never `check_remembered`: `generation` is the session's
        // record, which can move without the view's count moving.
        if let Some(by) = self.view.check(TokenIds {
            jti: &claims.jti,
            session_id: &claims.sid,
            subject: &claims.sub,
            generation,
            epoch: 0,
        }) {
            return Ok(Some(by));
        }
        if claims.exp > exp_max {
            self.store.raise_access_exp(&claims.sid, claims.exp).await?;
            self.monitor.raised_access_exp(&claims.sid, claims.exp);
        }
        Ok(None)
    }

    async fn open_foreign(
        &self,
        claims: &AccessClaims,
        request: &RequestInfo,
    ) -> Result<(), SessionError> {
        let ip = request.ip.ok_or(SessionError::MissingClientIp)?;
        let client = Client {
            ip,
            user_agent: request.user_agent.clone().unwrap_or_default(),
        };
        let info = self.monitor.enrich(ip, &client.user_agent);
        let now = self.clock.now();
        let record = SessionRecord {
            session_id: claims.sid.clone(),
            subject: claims.sub.clone(),
            created_at: now,
            last_seen_at: now,
            // The binding's time: the first sighting, not the issuer's sign-in.
            auth_time: now,
            binding: binding_digest(&info.binding_text()),
            ip: ip.to_string(),
            user_agent: client.user_agent.clone(),
            acr: claims.acr.clone(),
            amr: claims
                .amr
                .as_ref()
                .and_then(|a| serde_json::to_string(a).ok()),
            claims: Some(serde_json::json!({ "iss": claims.iss }).to_string()),
            state: STATE_ACTIVE.to_owned(),
            revoked_at: None,
            revoked_reason: None,
            epoch: 0,
            epoch_until: 0,
            user_generation: self.store.user_generation(&claims.sub).await?,
            access_exp_max: claims.exp,
            binding_info: serde_json::to_string(&info).ok(),
            risk: 0.0,
            risk_at: self.clock.now_millis(),
            last_seen_info: None,
            step_up_message: None,
        };
        let stored = self.store.create_session_if_absent(&record).await?;
        if stored == record {
            tracing::info!(session_id = %record.session_id, issuer = %claims.iss, "session of another issuer bound at first sighting");
            self.emit_sign_in(EventKind::SessionOpen, &record, &client, &info);
        }
        Ok(())
    }

    /// Makes a decision durable before it is answered: step-up flag, revocations.
    async fn enforce(
        &self,
        a: &Assessment,
        session_id: &str,
        subject: &str,
    ) -> Result<(), SessionError> {
        let e = &a.evaluation;
        match e.decision {
            Decision::StepUp if a.newly_stepped_up => {
                if let Err(err) = self
                    .store
                    .set_step_up(
                        session_id,
                        e.session_risk,
                        self.clock.now_millis(),
                        e.user_message.as_deref(),
                    )
                    .await
                {
                    // Not durable, so not remembered either: the next request tries again.
                    self.monitor.clear_step_up(session_id);
                    return Err(err.into());
                }
                tracing::info!(
                    session_id,
                    subject,
                    risk = e.session_risk,
                    "session must re-authenticate"
                );
            }
            Decision::Revoke => {
                self.logout(session_id, &risk_reason(e)).await?;
                tracing::warn!(
                    session_id,
                    subject,
                    risk = e.session_risk,
                    "session revoked by the risk rules"
                );
            }
            Decision::RevokeUser => {
                let subject_ok = Subject::parse(subject).map_err(|_| SessionError::NotFound)?;
                self.logout_all_because(&subject_ok, &risk_reason(e))
                    .await?;
                tracing::warn!(
                    session_id,
                    subject,
                    risk = e.session_risk,
                    "every session of the user revoked by the risk rules"
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Verifies the token, then scores the request against the rules. Revocations the
    /// rules decide are durable before this returns.
    pub async fn verify(
        &self,
        token: &str,
        request: &RequestInfo,
    ) -> Result<Verdict, SessionError> {
        let (verdict, client) = self.decide(token, request).await?;
        // Timed after the decision, so it follows any event its enforcement recorded.
        let mut event = self.event(EventKind::Request).request(request);
        event = match &verdict {
            Verdict::Assessed(claims, e) => event.session(&claims.sid, &claims.sub).evaluation(e),
            Verdict::Revoked(claims, by) => event
                .session(&claims.sid, &claims.sub)
                .decision("revoke")
                .detail(by.code()),
            Verdict::Invalid(e) => event.decision("invalid").detail(e.code()),
        };
        if let Some(c) = &client {
            event = event.client(c);
        }
        self.emit(event);
        Ok(verdict)
    }

    async fn decide(
        &self,
        token: &str,
        request: &RequestInfo,
    ) -> Result<(Verdict, Option<Arc<crate::enrich::ClientInfo>>), SessionError> {
        let mut checked = self.check_token(token);
        // Another issuer may have rotated its keys: fetch its JWKS again (rate-bounded).
        if matches!(checked, Err(Verdict::Invalid(TokenError::UnknownKey)))
            && let Some(issuer) = self.codec.external().claimed_by(token)
            && issuer.refresh().await
        {
            checked = self.check_token(token);
        }
        let claims = match checked {
            Ok(c) => c,
            Err(verdict) => return Ok((verdict, None)),
        };
        if let Some(why) = self.stale() {
            return Err(SessionError::Unavailable(why));
        }
        // Boxed: its future is most of this one's size, and only another issuer's
        // tokens need it. Every request's future is moved into the heap by the
        // router, a copy of its whole size.
        if claims.foreign
            && let Some(by) = Box::pin(self.sight_foreign(&claims, request)).await?
        {
            return Ok((Verdict::Revoked(claims, by), None));
        }
        let ids = (
            claims.jti.as_str(),
            claims.sid.as_str(),
            claims.sub.as_str(),
        );
        // The session's state is looked up once: the assessment finds it in memory
        // (nearly always), or it is loaded from the store and assessed then.
        let assessment = match self
            .monitor
            .assess(RequestKind::Request, ids, request, false)
        {
            Some(a) => a,
            // Not in memory: the session's first request on this node, or its state
            // was evicted or dropped by a change from the feed.
            None => {
                if !self.ensure_loaded(&claims.sid, &claims.sub).await? {
                    return Ok((Verdict::Revoked(claims, RevokedBy::Session), None));
                }
                self.monitor
                    .assess(RequestKind::Request, ids, request, false)
                    .ok_or(SessionError::MissingClientIp)?
            }
        };
        self.enforce(&assessment, &claims.sid, &claims.sub).await?;
        Ok((
            Verdict::Assessed(claims, Box::new(assessment.evaluation)),
            Some(assessment.client),
        ))
    }

    /// RFC 7009: a refresh token ends its session (and so every access token of it);
    /// an access token is revoked by `jti`. Unknown or invalid tokens are not an error.
    pub async fn revoke_token(&self, token: &str) -> Result<(), SessionError> {
        if let Some(hash) = refresh_hash(token) {
            if let Some(record) = self.store.refresh_token(&hash).await? {
                self.logout(&record.session_id, "rfc7009").await?;
            }
            return Ok(());
        }
        match self.check_token(token) {
            Ok(claims) => {
                self.store
                    .revoke_jti(&RevokedJti {
                        jti: claims.jti.clone(),
                        session_id: claims.sid.clone(),
                        subject: claims.sub.clone(),
                        exp: claims.exp,
                        revoked_at: self.clock.now(),
                        reason: "rfc7009".to_owned(),
                    })
                    .await?;
                self.emit(
                    self.event(EventKind::Revoke)
                        .session(&claims.sid, &claims.sub)
                        .decision("revoke")
                        .detail("rfc7009: access token"),
                );
                self.view.apply(Change::JtiRevoked {
                    jti: claims.jti.clone(),
                    until: claims.exp,
                });
                Ok(())
            }
            Err(_) => Ok(()),
        }
    }

    /// RFC 7662: whether a token is active, with its claims when it is.
    pub async fn introspect(&self, token: &str) -> Result<serde_json::Value, SessionError> {
        let inactive = serde_json::json!({ "active": false });
        if let Some(hash) = refresh_hash(token) {
            let Some(record) = self.store.refresh_token(&hash).await? else {
                return Ok(inactive);
            };
            let now = self.clock.now();
            let Some(session) = self.store.session(&record.session_id).await? else {
                return Ok(inactive);
            };
            let generation = self.store.user_generation(&session.subject).await?;
            if record.retired_at.is_some()
                || record.expires_at <= now
                || session.is_revoked()
                || session.user_generation < generation
            {
                return Ok(inactive);
            }
            return Ok(serde_json::json!({
                "active": true,
                "token_type": "refresh_token",
                "sub": session.subject,
                "sid": session.session_id,
                "iat": record.issued_at,
                "exp": record.expires_at,
                "iss": self.codec.issuer(),
            }));
        }
        Ok(match self.check_token(token) {
            Ok(_) if self.stale().is_some() => {
                return Err(SessionError::Unavailable(self.stale().unwrap_or_default()));
            }
            Ok(claims) if claims.foreign => {
                // Its state is its session's record: revoked, or older than a log-out-everywhere.
                let Some(session) = self.store.session(&claims.sid).await? else {
                    return Ok(inactive);
                };
                let generation = self.store.user_generation(&session.subject).await?;
                if session.is_revoked() || session.user_generation < generation {
                    return Ok(inactive);
                }
                serde_json::json!({
                    "active": true,
                    "token_type": "access_token",
                    "iss": claims.iss, "aud": claims.aud, "sub": claims.sub,
                    "jti": claims.jti, "sid": claims.sid, "iat": claims.iat,
                    "exp": claims.exp, "auth_time": claims.auth_time,
                })
            }
            Ok(claims) => {
                let mut body = serde_json::to_value(&claims).unwrap_or(serde_json::Value::Null);
                if let Some(obj) = body.as_object_mut() {
                    obj.insert("active".into(), true.into());
                    obj.insert("token_type".into(), "access_token".into());
                }
                body
            }
            _ => inactive,
        })
    }

    /// Applies a change made by another node (or replayed from the feed): the
    /// revocation view, and the risk state it invalidates.
    pub fn apply_remote(&self, change: Change) {
        match &change {
            Change::SessionRevoked { session_id, .. } | Change::SessionEpoch { session_id, .. } => {
                // Reloaded from the store on its next request (new binding, risk, flags).
                self.monitor.forget(session_id);
            }
            Change::StepUp {
                session_id,
                message,
            } => self.monitor.mark_step_up(session_id, message.clone()),
            Change::JtiRevoked { .. } | Change::UserGeneration { .. } => {}
        }
        self.view.apply(change);
    }

    /// Rebuilds the revocation view from the store and drops all cached risk state:
    /// for a node that lost track of the change feed.
    pub async fn resync(&self) -> Result<(), SessionError> {
        let now = self.clock.now();
        for change in self.store.revocations(now - self.codec.leeway()).await? {
            self.view.apply(change);
        }
        // Sightings not yet written behind would be lost with the cached state.
        let unsaved = self.monitor.take_dirty(true);
        if let Err(e) = self.store.save_last_seen(&unsaved).await {
            tracing::warn!(error = %e, sessions = unsaved.len(), "cannot save last-seen observations before a resync; they are lost");
        }
        self.monitor.forget_all();
        Ok(())
    }

    /// When set, a node whose change feed is stale refuses to allow (fail closed).
    pub fn set_freshness_guard(&self, guard: Arc<dyn Fn() -> Option<String> + Send + Sync>) {
        let _ = self.freshness.set(guard);
    }

    /// Where audit events go (none: not recorded).
    pub fn set_event_sink(&self, sink: Arc<EventSink>) {
        let _ = self.events.set(sink);
    }

    pub fn event_sink(&self) -> Option<&Arc<EventSink>> {
        self.events.get()
    }

    fn emit(&self, event: EventRef<'_>) {
        if let Some(sink) = self.events.get() {
            sink.record(event);
        }
    }

    fn event(&self, kind: EventKind) -> EventRef<'static> {
        EventRef::new(kind, self.clock.now_millis())
    }

    /// The event of a sign-in (session opened or re-authenticated): always `allow`.
    fn emit_sign_in(
        &self,
        kind: EventKind,
        session: &SessionRecord,
        client: &Client,
        info: &crate::enrich::ClientInfo,
    ) {
        self.emit(
            self.event(kind)
                .session(&session.session_id, &session.subject)
                .request(&client.request_info())
                .client(info)
                .decision("allow"),
        );
    }

    fn stale(&self) -> Option<String> {
        self.freshness.get().and_then(|g| g())
    }

    /// Drops revocation entries no live token can need (called periodically).
    pub fn prune(&self) {
        self.view.prune(self.clock.now(), self.codec.leeway());
    }

    /// Bounds the risk state: sessions idle longer than an access token lives are
    /// dropped from memory (and reloaded from the store if they come back).
    pub fn maintain(&self) {
        let idle_ms = (self.access_ttl() + self.codec.leeway()).saturating_mul(1000);
        self.monitor
            .maintain(self.clock.now_millis().saturating_sub(idle_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_tokens_of_the_wrong_shape_are_refused_before_any_lookup() {
        assert!(refresh_hash("twr_abcDEF-_09").is_some());
        assert!(refresh_hash("abc").is_none());
        assert!(refresh_hash("twr_").is_none());
        assert!(refresh_hash("twr_a b").is_none());
        assert!(refresh_hash(&format!("twr_{}", "a".repeat(200))).is_none());
    }
}
