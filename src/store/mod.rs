//! Durable state behind one small trait, [`Store`], with one implementation per
//! database ([`sql`]). Only this module holds SQL. Every method that changes state
//! commits before it returns, so the API never acknowledges what is not durable.

mod audit;
mod sql;

use std::sync::Arc;

use async_trait::async_trait;

use crate::clock::UnixSeconds;
use crate::revocation::Change;

pub use sql::{CHANGE_CHANNEL, PostgresStore, SqliteStore, change_listener};

/// The change that revoking this session records.
pub fn session_revoked(s: &SessionRecord) -> Change {
    Change::SessionRevoked {
        session_id: s.session_id.clone(),
        until: s.access_exp_max,
    }
}

/// The change that a re-authentication of this session records.
pub fn session_reauthenticated(s: &SessionRecord) -> Change {
    Change::SessionEpoch {
        session_id: s.session_id.clone(),
        epoch: s.epoch,
        until: s.epoch_until,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database's worker thread failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot encode a change: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot compress audit events: {0}")]
    Compress(std::io::Error),
    #[error("cannot set up the audit log's compression: {0}")]
    Compressor(std::io::Error),
    #[error("the audit log's row {id} cannot be read: {why}")]
    AuditRow { id: i64, why: String },
    #[error("unsupported database URL (use sqlite://… or postgres://…)")]
    UnsupportedUrl,
    #[error("cannot create the database folder {path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
}

/// A session row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SessionRecord {
    pub session_id: String,
    pub subject: String,
    pub created_at: i64,
    pub last_seen_at: i64,
    pub auth_time: i64,
    pub ip: String,
    pub user_agent: String,
    pub binding: String,
    pub acr: Option<String>,
    pub amr: Option<String>,
    pub claims: Option<String>,
    pub state: String,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
    pub epoch: i64,
    pub epoch_until: i64,
    pub user_generation: i64,
    pub access_exp_max: i64,
    /// The enriched binding as JSON (`enrich::ClientInfo`).
    pub binding_info: Option<String>,
    pub risk: f64,
    /// Milliseconds since the epoch.
    pub risk_at: i64,
    /// The last request's observation as JSON (`risk::Observation`), written behind.
    pub last_seen_info: Option<String>,
    /// Why the session must re-authenticate (set with the step-up state).
    pub step_up_message: Option<String>,
}

/// An audit event as stored: the columns it is filtered by, and its JSON line.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub ts_ms: i64,
    /// The kind and the decision are most often one of a few words, borrowed.
    pub kind: std::borrow::Cow<'static, str>,
    pub session_id: Option<String>,
    pub subject: Option<String>,
    pub decision: Option<std::borrow::Cow<'static, str>>,
    /// The event as one JSON object (stored and exported exactly as given).
    pub event: String,
}

/// Which events to read, oldest first.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub subject: Option<String>,
    pub session_id: Option<String>,
    pub decision: Option<String>,
    /// Start after this (time, id) position (paging); `(i64::MIN, 0)` for the start.
    pub after: (i64, i64),
    pub limit: i64,
}

/// What the risk engine remembers of a session's last request, to persist.
#[derive(Debug, Clone)]
pub struct LastSeen {
    pub session_id: String,
    pub at: UnixSeconds,
    pub observation: String,
    pub risk: f64,
    pub risk_at_ms: i64,
}

impl SessionRecord {
    pub fn is_revoked(&self) -> bool {
        self.state == STATE_REVOKED
    }

    /// The issuer of a session another issuer's token opened (`claims.iss`: apps can
    /// never set `iss` themselves, it is a reserved claim). `None` for our own.
    pub fn foreign_issuer(&self) -> Option<String> {
        let claims: serde_json::Value = serde_json::from_str(self.claims.as_deref()?).ok()?;
        claims.get("iss")?.as_str().map(str::to_owned)
    }
}

pub const STATE_ACTIVE: &str = "active";
pub const STATE_STEP_UP: &str = "step_up";
pub const STATE_REVOKED: &str = "revoked";

/// A refresh token as stored: its hash, never the token.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RefreshRecord {
    pub token_hash: String,
    pub session_id: String,
    pub parent_hash: Option<String>,
    pub issued_at: i64,
    pub expires_at: i64,
    pub retired_at: Option<i64>,
    pub retired_reason: Option<String>,
}

/// The new refresh token to store when a rotation succeeds.
#[derive(Debug, Clone)]
pub struct NewRefresh {
    pub token_hash: String,
    pub issued_at: UnixSeconds,
    pub expires_at: UnixSeconds,
}

/// What the client looked like on this request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: UnixSeconds,
    pub ip: String,
    pub user_agent: String,
}

#[derive(Debug, Clone)]
pub struct RotateRequest {
    pub presented_hash: String,
    pub next: NewRefresh,
    pub grace_secs: i64,
    pub seen: Seen,
    /// `exp` of the access token that will be minted with the new refresh token.
    pub access_exp: UnixSeconds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshRejection {
    Unknown,
    Expired,
    SessionRevoked,
    /// Replaced by a re-authentication: refused, but not theft evidence.
    Superseded,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RotateOutcome {
    /// The presented token is retired and the new one stored. The session after the update.
    Rotated(SessionRecord),
    /// An already-rotated token came back: the session is now revoked.
    Reused(SessionRecord),
    Rejected(RefreshRejection),
}

/// What to do with a presented refresh token; one decision for every database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateAction {
    /// The current token: retire it (and any grace sibling), issue its child.
    Rotate,
    /// The immediate predecessor of a current token, inside the grace window: issue another child.
    GraceSibling,
    /// Theft evidence: revoke the session.
    Reuse,
    Reject(RefreshRejection),
}

/// The rotation rules, a pure function the stores call inside their transaction.
pub fn classify_refresh(
    token: &RefreshRecord,
    session: &SessionRecord,
    user_generation: i64,
    has_current_child: bool,
    now: UnixSeconds,
    grace_secs: i64,
) -> RotateAction {
    if session.is_revoked() || session.user_generation < user_generation {
        return RotateAction::Reject(RefreshRejection::SessionRevoked);
    }
    match (token.retired_at, token.retired_reason.as_deref()) {
        (None, _) if token.expires_at <= now => RotateAction::Reject(RefreshRejection::Expired),
        (None, _) => RotateAction::Rotate,
        (Some(_), Some("reauth")) => RotateAction::Reject(RefreshRejection::Superseded),
        (Some(_), Some("revoked")) => RotateAction::Reject(RefreshRejection::SessionRevoked),
        (Some(retired), _) => {
            if has_current_child && now - retired < grace_secs && token.expires_at > now {
                RotateAction::GraceSibling
            } else {
                RotateAction::Reuse
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReauthRequest {
    pub session_id: String,
    pub seen: Seen,
    pub binding: String,
    pub binding_info: Option<String>,
    pub next: NewRefresh,
    pub access_exp: UnixSeconds,
}

#[derive(Debug, Clone)]
pub struct RevokedJti {
    pub jti: String,
    pub session_id: String,
    pub subject: String,
    pub exp: UnixSeconds,
    pub revoked_at: UnixSeconds,
    pub reason: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    async fn migrate(&self) -> Result<(), StoreError>;
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new session with its first refresh token, in one transaction.
    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: &NewRefresh,
    ) -> Result<(), StoreError>;
    async fn session(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// The subject's sessions, newest first (revoked ones included).
    async fn sessions_of(&self, subject: &str) -> Result<Vec<SessionRecord>, StoreError>;
    /// Raises the session's latest access-token expiry (the horizon its revocation
    /// must cover) to `exp`, for tokens another issuer keeps minting for it.
    async fn raise_access_exp(&self, session_id: &str, exp: i64) -> Result<(), StoreError>;
    /// Creates the session unless one with its id exists; returns the stored one
    /// (a session of another issuer, bound at its first sighting).
    async fn create_session_if_absent(
        &self,
        s: &SessionRecord,
    ) -> Result<SessionRecord, StoreError>;
    async fn user_generation(&self, subject: &str) -> Result<i64, StoreError>;
    async fn refresh_token(&self, token_hash: &str) -> Result<Option<RefreshRecord>, StoreError>;

    /// Rotation with reuse detection, atomically (see [`classify_refresh`]).
    async fn rotate_refresh(&self, request: &RotateRequest) -> Result<RotateOutcome, StoreError>;
    /// Re-binds the session, bumps its epoch, clears step-up and retires its refresh tokens.
    /// `None` when the session is unknown or revoked.
    async fn reauth(&self, request: &ReauthRequest) -> Result<Option<SessionRecord>, StoreError>;
    /// Revokes one session (idempotent). `None` when it does not exist.
    async fn revoke_session(
        &self,
        session_id: &str,
        reason: &str,
        now: UnixSeconds,
    ) -> Result<Option<SessionRecord>, StoreError>;
    /// Revokes every session of the subject and bumps its generation. `valid_until` is
    /// the least horizon; the store raises it to the latest `exp` it issued to the user.
    /// Returns (sessions newly revoked, new generation, horizon).
    async fn revoke_user(
        &self,
        subject: &str,
        now: UnixSeconds,
        valid_until: UnixSeconds,
    ) -> Result<(u64, i64, UnixSeconds), StoreError>;
    async fn revoke_jti(&self, revoked: &RevokedJti) -> Result<(), StoreError>;
    /// Marks an active session as needing re-authentication, with its risk and the
    /// message the user is shown until they re-authenticate.
    async fn set_step_up(
        &self,
        session_id: &str,
        risk: f64,
        risk_at_ms: i64,
        message: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Writes the sessions' last observations and risk (write-behind, one transaction).
    async fn save_last_seen(&self, batch: &[LastSeen]) -> Result<(), StoreError>;
    /// Stores a batch of audit events, all or none (shared, so a retry needs no copy).
    async fn insert_events(&self, events: Arc<[StoredEvent]>) -> Result<(), StoreError>;
    /// Events matching the filter, oldest first, as (time ms, id, JSON line).
    async fn events(&self, filter: &EventFilter) -> Result<Vec<(i64, i64, String)>, StoreError>;
    /// Deletes events older than `before_ms`; returns how many. SQLite keeps a batch
    /// of events to a row and deletes a row once all of its events are older (a row
    /// spans at most a minute).
    async fn prune_events(&self, before_ms: i64) -> Result<u64, StoreError>;
    /// The newest change's sequence number (0 when there is none).
    async fn head_change(&self) -> Result<i64, StoreError>;
    /// Changes after `after`, in order, at most `limit`.
    async fn changes_since(&self, after: i64, limit: i64)
    -> Result<Vec<(i64, Change)>, StoreError>;
    /// Deletes changes recorded before `before` (seconds); returns how many.
    async fn prune_changes(&self, before: UnixSeconds) -> Result<u64, StoreError>;

    /// Every revocation that can still matter at `now`, to fill the in-memory view.
    async fn revocations(&self, now: UnixSeconds) -> Result<Vec<Change>, StoreError>;
}

pub type SharedStore = Arc<dyn Store>;

/// Opens the database named by the URL (creating a SQLite file and its folder if needed).
pub async fn connect(url: &str) -> Result<SharedStore, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionRecord {
        SessionRecord {
            session_id: "s".into(),
            subject: "u".into(),
            created_at: 0,
            last_seen_at: 0,
            auth_time: 0,
            ip: "192.0.2.1".into(),
            user_agent: "ua".into(),
            binding: "b".into(),
            acr: None,
            amr: None,
            claims: None,
            state: STATE_ACTIVE.into(),
            revoked_at: None,
            revoked_reason: None,
            epoch: 0,
            epoch_until: 0,
            user_generation: 0,
            access_exp_max: 0,
            binding_info: None,
            risk: 0.0,
            risk_at: 0,
            last_seen_info: None,
            step_up_message: None,
        }
    }

    fn token(retired: Option<(i64, &str)>) -> RefreshRecord {
        RefreshRecord {
            token_hash: "h".into(),
            session_id: "s".into(),
            parent_hash: None,
            issued_at: 0,
            expires_at: 1_000,
            retired_at: retired.map(|r| r.0),
            retired_reason: retired.map(|r| r.1.to_owned()),
        }
    }

    #[test]
    fn the_current_token_rotates_until_it_expires() {
        let s = session();
        assert_eq!(
            classify_refresh(&token(None), &s, 0, false, 10, 10),
            RotateAction::Rotate
        );
        assert_eq!(
            classify_refresh(&token(None), &s, 0, false, 1_000, 10),
            RotateAction::Reject(RefreshRejection::Expired)
        );
    }

    #[test]
    fn only_the_immediate_predecessor_inside_the_grace_window_is_forgiven() {
        let s = session();
        let t = token(Some((100, "rotated")));
        assert_eq!(
            classify_refresh(&t, &s, 0, true, 109, 10),
            RotateAction::GraceSibling
        );
        assert_eq!(
            classify_refresh(&t, &s, 0, true, 110, 10),
            RotateAction::Reuse
        );
        // A zero window forgives nothing, not even the same second.
        assert_eq!(
            classify_refresh(&t, &s, 0, true, 100, 0),
            RotateAction::Reuse
        );
        // Two steps back: its child is itself retired, so there is no current child.
        assert_eq!(
            classify_refresh(&t, &s, 0, false, 101, 10),
            RotateAction::Reuse
        );
    }

    #[test]
    fn revoked_or_superseded_sessions_refuse_without_raising_an_alarm() {
        let mut s = session();
        assert_eq!(
            classify_refresh(&token(Some((1, "reauth"))), &s, 0, false, 5, 10),
            RotateAction::Reject(RefreshRejection::Superseded)
        );
        assert_eq!(
            classify_refresh(&token(None), &s, 1, false, 5, 10),
            RotateAction::Reject(RefreshRejection::SessionRevoked)
        );
        s.state = STATE_REVOKED.into();
        assert_eq!(
            classify_refresh(&token(Some((1, "rotated"))), &s, 0, false, 500, 10),
            RotateAction::Reject(RefreshRejection::SessionRevoked)
        );
    }
}
