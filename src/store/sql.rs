//! The SQLite and PostgreSQL stores. Both run the same code (expanded once per
//! database by `sql_store!`) over the SQL texts below; where the dialects differ
//! the text is chosen in [`Dialect`], never by branching inside a method.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::audit;
use super::{
    EventFilter, LastSeen, NewRefresh, ReauthRequest, RefreshRecord, RevokedJti, RotateAction,
    RotateOutcome, RotateRequest, SessionRecord, Store, StoreError, StoredEvent, classify_refresh,
};
use crate::clock::UnixSeconds;
use crate::revocation::Change;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// The statements whose text differs between the databases.
struct Dialect {
    /// SQLite must take the write lock up front: a deferred transaction that reads and then
    /// writes fails with "database is locked" instead of waiting.
    begin_write: &'static str,
    refresh_for_update: &'static str,
    session_for_update: &'static str,
    /// Serialises change writers so sequence numbers follow commit order (SQLite's
    /// write lock already does).
    lock_changes: Option<&'static str>,
    /// Wakes the other nodes when the transaction commits.
    notify_change: Option<&'static str>,
    /// Last sightings travel as one JSON array bound to `$1`: one statement per batch,
    /// so SQLite's connection thread is woken once per batch rather than once per row.
    save_last_seen: &'static str,
}

const SQLITE: Dialect = Dialect {
    begin_write: "BEGIN IMMEDIATE",
    refresh_for_update: "SELECT * FROM refresh_tokens WHERE token_hash = $1",
    session_for_update: "SELECT * FROM sessions WHERE session_id = $1",
    lock_changes: None,
    notify_change: None,
    save_last_seen: "UPDATE sessions SET last_seen_at = b.a, last_seen_info = b.o, risk = b.r, risk_at = b.t \
         FROM (SELECT value->>'s' AS s, value->>'a' AS a, value->>'o' AS o, value->>'r' AS r, value->>'t' AS t \
               FROM json_each($1)) AS b \
         WHERE sessions.session_id = b.s AND sessions.last_seen_at <= b.a",
};

const POSTGRES: Dialect = Dialect {
    begin_write: "BEGIN",
    refresh_for_update: "SELECT * FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
    session_for_update: "SELECT * FROM sessions WHERE session_id = $1 FOR UPDATE",
    lock_changes: Some("SELECT pg_advisory_xact_lock(7243001)"),
    notify_change: Some("SELECT pg_notify('tokenwarden_changes', $1)"),
    save_last_seen: "UPDATE sessions SET last_seen_at = b.a, last_seen_info = b.o, risk = b.r, risk_at = b.t \
         FROM json_to_recordset($1::json) AS b(s TEXT, a BIGINT, o TEXT, r DOUBLE PRECISION, t BIGINT) \
         WHERE sessions.session_id = b.s AND sessions.last_seen_at <= b.a",
};

/// Audit events on PostgreSQL: a row per event, one statement per batch, a JSON array
/// bound to `$1`. PostgreSQL serves the events query's subject and session filters
/// from its indexes, and its writes run on the database server, not beside request
/// handling. (SQLite stores a batch to a row instead: [`audit`], [`EventLog`].)
const PG_INSERT_EVENTS: &str = "INSERT INTO events (ts_ms, kind, session_id, subject, decision, event) \
     SELECT (e->>'t')::BIGINT, e->>'k', e->>'s', e->>'u', e->>'d', e->>'e' \
     FROM json_array_elements($1::json) WITH ORDINALITY AS x(e, n) ORDER BY n";

/// Audit events on SQLite: a batch to a row ([`audit`]).
const SQLITE_INSERT_EVENT_ROW: &str = "INSERT INTO event_batches (first_ms, last_ms, events, encoding, lines) \
     VALUES (?1, ?2, ?3, ?4, ?5)";
/// The audit log's rows that can hold events at or after `$3` and before `$4`, in
/// `(first_ms, id)` order after `($1, $2)`, a page at a time.
const SQLITE_SELECT_EVENT_ROWS: &str = "SELECT id, first_ms, encoding, lines FROM event_batches \
     WHERE (first_ms > $1 OR (first_ms = $1 AND id > $2)) AND first_ms < $4 AND last_ms >= $3 \
     ORDER BY first_ms, id LIMIT $5";
/// Audit rows read per query while the result is not complete.
const SQLITE_EVENT_ROWS_PER_PAGE: i64 = 16;
/// A row goes once all of its events are older than `$1` (`first_ms`, the index's
/// column, bounds the search).
const SQLITE_PRUNE_EVENT_ROWS: &str =
    "DELETE FROM event_batches WHERE first_ms < $1 AND last_ms < $1 RETURNING events";

/// Rows per bulk statement (a JSON array of this many objects).
const BULK_ROWS: usize = 1000;

/// One audit event in a bulk insert; short keys, as the statements read them.
#[derive(serde::Serialize)]
struct BulkEvent<'a> {
    t: i64,
    k: &'a str,
    s: Option<&'a str>,
    u: Option<&'a str>,
    d: Option<&'a str>,
    e: &'a str,
}

fn bulk_events(events: &[StoredEvent]) -> Result<String, serde_json::Error> {
    let rows: Vec<BulkEvent<'_>> = events
        .iter()
        .map(|e| BulkEvent {
            t: e.ts_ms,
            k: &e.kind,
            s: e.session_id.as_deref(),
            u: e.subject.as_deref(),
            d: e.decision.as_deref(),
            e: &e.event,
        })
        .collect();
    // Sized up front: a batch is large, and growing it by doubling copies it over.
    let size: usize = events.iter().map(|e| e.event.len() * 11 / 10 + 160).sum();
    let mut out = Vec::with_capacity(size);
    serde_json::to_writer(&mut out, &rows)?;
    // serde_json writes only UTF-8, so the lossy path is never taken.
    Ok(String::from_utf8(out)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// One session's last sighting in a bulk update.
#[derive(serde::Serialize)]
struct BulkLastSeen<'a> {
    s: &'a str,
    a: UnixSeconds,
    o: &'a str,
    r: f64,
    t: i64,
}

fn bulk_last_seen(batch: &[LastSeen]) -> Result<String, serde_json::Error> {
    let rows: Vec<BulkLastSeen<'_>> = batch
        .iter()
        .map(|l| BulkLastSeen {
            s: &l.session_id,
            a: l.at,
            o: &l.observation,
            r: l.risk,
            t: l.risk_at_ms,
        })
        .collect();
    serde_json::to_string(&rows)
}

/// The channel nodes LISTEN on; the payload is the new sequence number.
pub const CHANGE_CHANNEL: &str = "tokenwarden_changes";

/// The session row's columns and placeholders, for the two INSERTs below.
macro_rules! insert_session_sql {
    () => {
        "INSERT INTO sessions (session_id, subject, created_at, last_seen_at, auth_time, ip, user_agent, binding, acr, amr, claims, state, revoked_at, revoked_reason, epoch, epoch_until, user_generation, access_exp_max, binding_info, risk, risk_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)"
    };
}
const INSERT_SESSION: &str = insert_session_sql!();
/// A session of another issuer, first sighted: created once, whichever node sees it first.
const INSERT_SESSION_IF_ABSENT: &str = concat!(
    insert_session_sql!(),
    " ON CONFLICT (session_id) DO NOTHING"
);
const RAISE_ACCESS_EXP: &str =
    "UPDATE sessions SET access_exp_max = $2 WHERE session_id = $1 AND access_exp_max < $2";
const INSERT_REFRESH: &str = "INSERT INTO refresh_tokens (token_hash, session_id, parent_hash, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5)";
const SELECT_SESSION: &str = "SELECT * FROM sessions WHERE session_id = $1";
const SELECT_SESSIONS_OF: &str =
    "SELECT * FROM sessions WHERE subject = $1 ORDER BY created_at DESC, session_id";
const SELECT_REFRESH: &str = "SELECT * FROM refresh_tokens WHERE token_hash = $1";
const SELECT_REFRESH_SESSION: &str = "SELECT session_id FROM refresh_tokens WHERE token_hash = $1";
const SELECT_GENERATION: &str = "SELECT generation FROM users WHERE subject = $1";
const COUNT_CURRENT_CHILDREN: &str =
    "SELECT COUNT(*) FROM refresh_tokens WHERE parent_hash = $1 AND retired_at IS NULL";
const RETIRE_CURRENT_REFRESH: &str = "UPDATE refresh_tokens SET retired_at = $2, retired_reason = $3 WHERE session_id = $1 AND retired_at IS NULL";
const TOUCH_SESSION: &str = "UPDATE sessions SET last_seen_at = $2, \
     access_exp_max = CASE WHEN access_exp_max > $3 THEN access_exp_max ELSE $3 END \
     WHERE session_id = $1 RETURNING *";
const REVOKE_SESSION: &str = "UPDATE sessions SET state = 'revoked', revoked_at = $2, revoked_reason = $3 WHERE session_id = $1 AND state <> 'revoked' RETURNING *";
const REAUTH_SESSION: &str = "UPDATE sessions SET ip = $2, user_agent = $3, binding = $4, auth_time = $5, last_seen_at = $5, state = 'active', \
     epoch = epoch + 1, epoch_until = access_exp_max, \
     access_exp_max = CASE WHEN access_exp_max > $6 THEN access_exp_max ELSE $6 END, binding_info = $7, risk = 0, risk_at = $5 * 1000, step_up_message = NULL WHERE session_id = $1 RETURNING *";
const SET_STEP_UP: &str = "UPDATE sessions SET state = 'step_up', risk = $2, risk_at = $3, step_up_message = $4 WHERE session_id = $1 AND state = 'active'";
const BUMP_GENERATION: &str = "INSERT INTO users (subject, generation, valid_until) VALUES ($1, 1, $2) \
     ON CONFLICT (subject) DO UPDATE SET generation = users.generation + 1, \
     valid_until = CASE WHEN users.valid_until > excluded.valid_until THEN users.valid_until ELSE excluded.valid_until END \
     RETURNING generation, valid_until";
/// The latest `exp` any access token of the user's sessions can carry.
const USER_ACCESS_EXP_MAX: &str =
    "SELECT COALESCE(MAX(access_exp_max), 0) FROM sessions WHERE subject = $1";
const REVOKE_USER_SESSIONS: &str = "UPDATE sessions SET state = 'revoked', revoked_at = $2, revoked_reason = 'logout_all' WHERE subject = $1 AND state <> 'revoked'";
const RETIRE_USER_REFRESH: &str = "UPDATE refresh_tokens SET retired_at = $2, retired_reason = 'revoked' \
     WHERE retired_at IS NULL AND session_id IN (SELECT session_id FROM sessions WHERE subject = $1)";
const INSERT_REVOKED_JTI: &str = "INSERT INTO revoked_jti (jti, session_id, subject, exp, revoked_at, reason) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (jti) DO NOTHING";
const INSERT_CHANGE: &str = "INSERT INTO changes (seq, change, created_at) \
     SELECT COALESCE(MAX(seq), 0) + 1, $1, $2 FROM changes RETURNING seq";
const PG_SELECT_EVENTS: &str = "SELECT ts_ms, id, event FROM events WHERE (ts_ms > $1 OR (ts_ms = $1 AND id > $8)) AND ts_ms >= $2 AND ts_ms < $3 \
     AND (CAST($4 AS TEXT) IS NULL OR subject = $4) AND (CAST($5 AS TEXT) IS NULL OR session_id = $5) \
     AND (CAST($6 AS TEXT) IS NULL OR decision = $6) ORDER BY ts_ms, id LIMIT $7";
const PG_PRUNE_EVENTS: &str = "DELETE FROM events WHERE ts_ms < $1";
const HEAD_CHANGE: &str = "SELECT COALESCE(MAX(seq), 0) FROM changes";
const CHANGES_SINCE: &str = "SELECT seq, change FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2";
const PRUNE_CHANGES: &str =
    "DELETE FROM changes WHERE created_at < $1 AND seq < (SELECT MAX(seq) FROM changes)";
const LIVE_REVOKED_JTI: &str = "SELECT jti, exp FROM revoked_jti WHERE exp >= $1";
const LIVE_REVOKED_SESSIONS: &str = "SELECT session_id, access_exp_max FROM sessions WHERE state = 'revoked' AND access_exp_max >= $1";
const LIVE_EPOCHS: &str = "SELECT session_id, epoch, epoch_until FROM sessions WHERE epoch > 0 AND epoch_until >= $1 AND state <> 'revoked'";
const LIVE_GENERATIONS: &str =
    "SELECT subject, generation, valid_until FROM users WHERE valid_until >= $1";

/// Binds every column of a session row, in `insert_session_sql!` order.
macro_rules! bind_session {
    ($query:expr, $s:expr) => {
        $query
            .bind(&$s.session_id)
            .bind(&$s.subject)
            .bind($s.created_at)
            .bind($s.last_seen_at)
            .bind($s.auth_time)
            .bind(&$s.ip)
            .bind(&$s.user_agent)
            .bind(&$s.binding)
            .bind(&$s.acr)
            .bind(&$s.amr)
            .bind(&$s.claims)
            .bind(&$s.state)
            .bind($s.revoked_at)
            .bind(&$s.revoked_reason)
            .bind($s.epoch)
            .bind($s.epoch_until)
            .bind($s.user_generation)
            .bind($s.access_exp_max)
            .bind(&$s.binding_info)
            .bind($s.risk)
            .bind($s.risk_at)
    };
}

macro_rules! sql_store {
    ($store:ident, $db:ty, $pool:ty, $dialect:expr, $migrator:expr, $backend:literal) => {
        impl $store {
            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            /// Appends a change to the feed. Always the last statement of its transaction,
            /// so the feed lock is held only until the commit right after it.
            async fn record(
                tx: &mut sqlx::Transaction<'static, $db>,
                change: &Change,
                now: UnixSeconds,
            ) -> Result<(), StoreError> {
                if let Some(lock) = $dialect.lock_changes {
                    sqlx::query(lock).execute(&mut **tx).await?;
                }
                let (seq,): (i64,) = sqlx::query_as(INSERT_CHANGE)
                    .bind(serde_json::to_string(change)?)
                    .bind(now)
                    .fetch_one(&mut **tx)
                    .await?;
                if let Some(notify) = $dialect.notify_change {
                    sqlx::query(notify)
                        .bind(seq.to_string())
                        .execute(&mut **tx)
                        .await?;
                }
                Ok(())
            }
        }

        #[async_trait]
        impl Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn migrate(&self) -> Result<(), StoreError> {
                $migrator.run(&self.pool).await?;
                Ok(())
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn create_session_if_absent(
                &self,
                s: &SessionRecord,
            ) -> Result<SessionRecord, StoreError> {
                let mut tx = self.pool.begin_with($dialect.begin_write).await?;
                bind_session!(sqlx::query(INSERT_SESSION_IF_ABSENT), s)
                    .execute(&mut *tx)
                    .await?;
                let stored: SessionRecord = sqlx::query_as(SELECT_SESSION)
                    .bind(&s.session_id)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(stored)
            }

            async fn raise_access_exp(&self, session_id: &str, exp: i64) -> Result<(), StoreError> {
                sqlx::query(RAISE_ACCESS_EXP)
                    .bind(session_id)
                    .bind(exp)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn create_session(
                &self,
                s: &SessionRecord,
                refresh: &NewRefresh,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin_with($dialect.begin_write).await?;
                bind_session!(sqlx::query(INSERT_SESSION), s)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(INSERT_REFRESH)
                    .bind(&refresh.token_hash)
                    .bind(&s.session_id)
                    .bind(None::<String>)
                    .bind(refresh.issued_at)
                    .bind(refresh.expires_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn session(&self, session_id: &str) -> Result<Option<SessionRecord>, StoreError> {
                Ok(sqlx::query_as(SELECT_SESSION)
                    .bind(session_id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn sessions_of(&self, subject: &str) -> Result<Vec<SessionRecord>, StoreError> {
                Ok(sqlx::query_as(SELECT_SESSIONS_OF)
                    .bind(subject)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn user_generation(&self, subject: &str) -> Result<i64, StoreError> {
                let row: Option<(i64,)> = sqlx::query_as(SELECT_GENERATION)
                    .bind(subject)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map_or(0, |r| r.0))
            }

            async fn refresh_token(
                &self,
                token_hash: &str,
            ) -> Result<Option<RefreshRecord>, StoreError> {
                Ok(sqlx::query_as(SELECT_REFRESH)
                    .bind(token_hash)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn rotate_refresh(&self, r: &RotateRequest) -> Result<RotateOutcome, StoreError> {
                let mut tx = self.pool.begin_with($dialect.begin_write).await?;
                // Lock order everywhere: the session row, then its refresh tokens (logout,
                // reauth and revoke-all take them in that order too), so no deadlock.
                let owner: Option<(String,)> = sqlx::query_as(SELECT_REFRESH_SESSION)
                    .bind(&r.presented_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some((session_id,)) = owner else {
                    return Ok(RotateOutcome::Rejected(super::RefreshRejection::Unknown));
                };
                let session: Option<SessionRecord> = sqlx::query_as($dialect.session_for_update)
                    .bind(&session_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(session) = session else {
                    return Ok(RotateOutcome::Rejected(super::RefreshRejection::Unknown));
                };
                let token: Option<RefreshRecord> = sqlx::query_as($dialect.refresh_for_update)
                    .bind(&r.presented_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(token) = token else {
                    return Ok(RotateOutcome::Rejected(super::RefreshRejection::Unknown));
                };
                let generation: Option<(i64,)> = sqlx::query_as(SELECT_GENERATION)
                    .bind(&session.subject)
                    .fetch_optional(&mut *tx)
                    .await?;
                let (children,): (i64,) = sqlx::query_as(COUNT_CURRENT_CHILDREN)
                    .bind(&token.token_hash)
                    .fetch_one(&mut *tx)
                    .await?;
                let now = r.seen.at;
                let action = classify_refresh(
                    &token,
                    &session,
                    generation.map_or(0, |g| g.0),
                    children > 0,
                    now,
                    r.grace_secs,
                );
                let outcome = match action {
                    RotateAction::Reject(why) => return Ok(RotateOutcome::Rejected(why)),
                    RotateAction::Reuse => {
                        let revoked: SessionRecord = sqlx::query_as(REVOKE_SESSION)
                            .bind(&session.session_id)
                            .bind(now)
                            .bind("refresh_reuse")
                            .fetch_one(&mut *tx)
                            .await?;
                        sqlx::query(RETIRE_CURRENT_REFRESH)
                            .bind(&session.session_id)
                            .bind(now)
                            .bind("revoked")
                            .execute(&mut *tx)
                            .await?;
                        Self::record(&mut tx, &super::session_revoked(&revoked), now).await?;
                        RotateOutcome::Reused(revoked)
                    }
                    RotateAction::Rotate | RotateAction::GraceSibling => {
                        if action == RotateAction::Rotate {
                            sqlx::query(RETIRE_CURRENT_REFRESH)
                                .bind(&session.session_id)
                                .bind(now)
                                .bind("rotated")
                                .execute(&mut *tx)
                                .await?;
                        }
                        sqlx::query(INSERT_REFRESH)
                            .bind(&r.next.token_hash)
                            .bind(&session.session_id)
                            .bind(&token.token_hash)
                            .bind(r.next.issued_at)
                            .bind(r.next.expires_at)
                            .execute(&mut *tx)
                            .await?;
                        let touched: SessionRecord = sqlx::query_as(TOUCH_SESSION)
                            .bind(&session.session_id)
                            .bind(now)
                            .bind(r.access_exp)
                            .fetch_one(&mut *tx)
                            .await?;
                        RotateOutcome::Rotated(touched)
                    }
                };
                tx.commit().await?;
                Ok(outcome)
            }

            async fn reauth(&self, r: &ReauthRequest) -> Result<Option<SessionRecord>, StoreError> {
                let mut tx = self.pool.begin_with($dialect.begin_write).await?;
                let session: Option<SessionRecord> = sqlx::query_as($dialect.session_for_update)
                    .bind(&r.session_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                match session {
                    Some(s) if !s.is_revoked() => {}
                    _ => return Ok(None),
                }
                let updated: SessionRecord = sqlx::query_as(REAUTH_SESSION)
                    .bind(&r.session_id)
                    .bind(&r.seen.ip)
                    .bind(&r.seen.user_agent)
                    .bind(&r.binding)
                    .bind(r.seen.at)
                    .bind(r.access_exp)
                    .bind(&r.binding_info)
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query(RETIRE_CURRENT_REFRESH)
                    .bind(&r.session_id)
                    .bind(r.seen.at)
                    .bind("reauth")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(INSERT_REFRESH)
                    .bind(&r.next.token_hash)
                    .bind(&r.session_id)
                    .bind(None::<String>)
                    .bind(r.next.issued_at)
                    .bind(r.next.expires_at)
                    .execute(&mut *tx)
                    .await?;
                Self::record(
                    &mut tx,
                    &super::session_reauthenticated(&updated),
                    r.seen.at,
                )
                .await?;
                tx.commit().await?;
                Ok(Some(updated))
            }

            async fn revoke_session(
                &self,
                session_id: &str,
                reason: &str,
                now: UnixSeconds,
            ) -> Result<Option<SessionRecord>, StoreError> {
                let mut tx = self.pool.begin_with($dialect.begin_write).await?;
                let revoked: Option<SessionRecord> = sqlx::query_as(REVOKE_SESSION)
                    .bind(session_id)
                    .bind(now)
                    .bind(reason)
                    .fetch_optional(&mut *tx)
                    .await?;
                let result = match revoked {
                    Some(s) => {
                        sqlx::query(RETIRE_CURRENT_REFRESH)
                            .bind(session_id)
                            .bind(now)
                            .bind("revoked")
                            .execute(&mut *tx)
                            .await?;
                        Self::record(&mut tx, &super::session_revoked(&s), now).await?;
                        Some(s)
                    }
                    // Already revoked (idempotent) or unknown.
                    None => {
                        sqlx::query_as(SELECT_SESSION)
                            .bind(session_id)
                            .fetch_optional(&mut *tx)
                            .await?
                    }
                };
                tx.commit().await?;
                Ok(result)
            }

            async fn revoke_user(
                &self,
                subject: &str,
                now: UnixSeconds,
                valid_until: UnixSeconds,
            ) -> Result<(u64, i64, UnixSeconds), StoreError> {
                let mut tx = self.pool.begin_with($dialect.begin_write).await?;
                // Sessions first (the same lock order as rotation), so a rotation in flight
                // has committed its token's exp before the horizon below is read.
                let revoked = sqlx::query(REVOKE_USER_SESSIONS)
                    .bind(subject)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query(RETIRE_USER_REFRESH)
                    .bind(subject)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                let (issued_max,): (i64,) = sqlx::query_as(USER_ACCESS_EXP_MAX)
                    .bind(subject)
                    .fetch_one(&mut *tx)
                    .await?;
                let (generation, until): (i64, i64) = sqlx::query_as(BUMP_GENERATION)
                    .bind(subject)
                    .bind(valid_until.max(issued_max))
                    .fetch_one(&mut *tx)
                    .await?;
                let change = Change::UserGeneration {
                    subject: subject.to_owned(),
                    generation,
                    until,
                };
                Self::record(&mut tx, &change, now).await?;
                tx.commit().await?;
                Ok((revoked, generation, until))
            }

            async fn revoke_jti(&self, j: &RevokedJti) -> Result<(), StoreError> {
                let mut tx = self.pool.begin_with($dialect.begin_write).await?;
                let inserted = sqlx::query(INSERT_REVOKED_JTI)
                    .bind(&j.jti)
                    .bind(&j.session_id)
                    .bind(&j.subject)
                    .bind(j.exp)
                    .bind(j.revoked_at)
                    .bind(&j.reason)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if inserted > 0 {
                    let change = Change::JtiRevoked {
                        jti: j.jti.clone(),
                        until: j.exp,
                    };
                    Self::record(&mut tx, &change, j.revoked_at).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn set_step_up(
                &self,
                session_id: &str,
                risk: f64,
                risk_at_ms: i64,
                message: Option<&str>,
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin_with($dialect.begin_write).await?;
                let updated = sqlx::query(SET_STEP_UP)
                    .bind(session_id)
                    .bind(risk)
                    .bind(risk_at_ms)
                    .bind(message)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if updated > 0 {
                    let change = Change::StepUp {
                        session_id: session_id.to_owned(),
                        message: message.map(str::to_owned),
                    };
                    Self::record(&mut tx, &change, risk_at_ms / 1000).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn save_last_seen(&self, batch: &[LastSeen]) -> Result<(), StoreError> {
                // Each chunk is one statement and commits on its own; a failed chunk
                // fails the call and the caller marks every session dirty again (the
                // `last_seen_at` guard makes writing one twice harmless).
                for chunk in batch.chunks(BULK_ROWS) {
                    sqlx::query($dialect.save_last_seen)
                        .bind(bulk_last_seen(chunk)?)
                        .execute(&self.bulk)
                        .await?;
                }
                Ok(())
            }

            async fn insert_events(&self, events: Arc<[StoredEvent]>) -> Result<(), StoreError> {
                if events.is_empty() {
                    return Ok(());
                }
                // Stored whole or not at all.
                self.write_events(events).await
            }

            async fn events(&self, f: &EventFilter) -> Result<Vec<(i64, i64, String)>, StoreError> {
                self.read_events(f).await
            }

            async fn prune_events(&self, before_ms: i64) -> Result<u64, StoreError> {
                self.delete_events(before_ms).await
            }

            async fn head_change(&self) -> Result<i64, StoreError> {
                let (head,): (i64,) = sqlx::query_as(HEAD_CHANGE).fetch_one(&self.pool).await?;
                Ok(head)
            }

            async fn changes_since(
                &self,
                after: i64,
                limit: i64,
            ) -> Result<Vec<(i64, Change)>, StoreError> {
                let rows: Vec<(i64, String)> = sqlx::query_as(CHANGES_SINCE)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter()
                    .map(|(seq, json)| Ok((seq, serde_json::from_str(&json)?)))
                    .collect()
            }

            async fn prune_changes(&self, before: UnixSeconds) -> Result<u64, StoreError> {
                Ok(sqlx::query(PRUNE_CHANGES)
                    .bind(before)
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }

            async fn revocations(&self, after: UnixSeconds) -> Result<Vec<Change>, StoreError> {
                let mut changes = Vec::new();
                let jtis: Vec<(String, i64)> = sqlx::query_as(LIVE_REVOKED_JTI)
                    .bind(after)
                    .fetch_all(&self.pool)
                    .await?;
                changes.extend(
                    jtis.into_iter()
                        .map(|(jti, until)| Change::JtiRevoked { jti, until }),
                );
                let sessions: Vec<(String, i64)> = sqlx::query_as(LIVE_REVOKED_SESSIONS)
                    .bind(after)
                    .fetch_all(&self.pool)
                    .await?;
                changes.extend(
                    sessions
                        .into_iter()
                        .map(|(session_id, until)| Change::SessionRevoked { session_id, until }),
                );
                let epochs: Vec<(String, i64, i64)> = sqlx::query_as(LIVE_EPOCHS)
                    .bind(after)
                    .fetch_all(&self.pool)
                    .await?;
                changes.extend(epochs.into_iter().map(|(session_id, epoch, until)| {
                    Change::SessionEpoch {
                        session_id,
                        epoch,
                        until,
                    }
                }));
                let users: Vec<(String, i64, i64)> = sqlx::query_as(LIVE_GENERATIONS)
                    .bind(after)
                    .fetch_all(&self.pool)
                    .await?;
                changes.extend(users.into_iter().map(|(subject, generation, until)| {
                    Change::UserGeneration {
                        subject,
                        generation,
                        until,
                    }
                }));
                Ok(changes)
            }
        }
    };
}

/// The embedded default: one SQLite file in WAL mode.
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection of its own for the last sightings' write-behind. SQLite empties
    /// a connection's page cache whenever another connection has written, so a writer
    /// that rotated through the pool would re-read the pages it updates on every batch.
    bulk: SqlitePool,
    /// The audit log's own connection, for the same reason.
    events: EventLog,
}

/// The audit log's writer on SQLite: a connection of its own, driven through SQLite's
/// own API (rusqlite) on a blocking thread, each batch stored as one row ([`audit`])
/// in one transaction. Through sqlx every statement is a round trip to the
/// connection's thread.
struct EventLog {
    writer: Arc<Mutex<AuditWriter>>,
}

/// What the audit log's writer keeps between batches.
struct AuditWriter {
    conn: rusqlite::Connection,
    /// zstd's context, kept: making one per batch would allocate and clear it each time.
    zstd: zstd::bulk::Compressor<'static>,
}

impl EventLog {
    /// Opens the file sqlx opened (and created), with the pool's flags, busy timeout
    /// and synchronous mode (its checkpoint interval and page cache are its own, below);
    /// the table exists once migrations ran, so statements are prepared at the first
    /// batch.
    async fn open(path: std::path::PathBuf) -> Result<Self, StoreError> {
        let writer = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            // The flags sqlx opens with, file names as URIs included.
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                    | rusqlite::OpenFlags::SQLITE_OPEN_URI
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            // This connection writes nearly all of the WAL, so it runs nearly every
            // checkpoint, on the writer's thread, and each ends with an fsync of what it
            // copied. Every 1,000 pages (4 MB, SQLite's default) a checkpoint is short;
            // at 10,000 (40 MB) each stalled the writer long enough, at saturation, for
            // the queue to fill and events to be dropped. A checkpoint copies the whole
            // WAL, so while events are written the database is checkpointed about every
            // 4 MB whoever wrote: the audit log's pages are appended and copied once
            // either way; a page of sightings rewritten within one 40 MB window may now
            // be copied more than once (the measured gain includes that).
            conn.pragma_update(None, "wal_autocheckpoint", 1000)?;
            // SQLite's default page cache (2 MiB): the audit log is appended to, so a
            // batch only touches the right edge of the table and of its one index. A
            // larger cache held no page that is read again, and while it filled, every
            // new page grew the C heap by a system call (most of the writer's cost at a
            // moderate rate, which never filled it).
            let zstd =
                zstd::bulk::Compressor::new(audit::ZSTD_LEVEL).map_err(StoreError::Compressor)?;
            Ok(AuditWriter { conn, zstd })
        })
        .await??;
        Ok(Self {
            writer: Arc::new(Mutex::new(writer)),
        })
    }

    async fn insert(&self, events: Arc<[StoredEvent]>) -> Result<(), StoreError> {
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            // Poisoned only if a batch panicked; the connection itself is still sound.
            let mut writer = writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let writer = &mut *writer;
            let conn = &mut writer.conn;
            // A failed batch's transaction is rolled back when it is dropped; should that
            // rollback itself have failed, end it here, or no batch could begin again.
            if !conn.is_autocommit() {
                conn.execute_batch("ROLLBACK")?;
            }
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut insert = tx.prepare_cached(SQLITE_INSERT_EVENT_ROW)?;
                for row in audit::rows(&events) {
                    let lines = audit::encode(&mut writer.zstd, &row.lines)
                        .map_err(StoreError::Compress)?;
                    insert.execute(rusqlite::params![
                        row.first_ms,
                        row.last_ms,
                        row.count,
                        audit::ENCODING_ZSTD,
                        lines
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await??;
        Ok(())
    }
}

impl SqliteStore {
    async fn write_events(&self, events: Arc<[StoredEvent]>) -> Result<(), StoreError> {
        self.events.insert(events).await
    }

    async fn read_events(&self, f: &EventFilter) -> Result<Vec<(i64, i64, String)>, StoreError> {
        if f.limit <= 0 {
            return Ok(Vec::new());
        }
        let mut found = audit::Collector::new(f);
        let (mut after, lo, hi) = found.bounds();
        // One snapshot for every page (WAL: a read transaction sees the log as it was
        // at its first read), so a batch committed meanwhile cannot fall between pages.
        let mut snapshot = self.pool.begin().await?;
        loop {
            let page: Vec<(i64, i64, String, Vec<u8>)> = sqlx::query_as(SQLITE_SELECT_EVENT_ROWS)
                .bind(after.0)
                .bind(after.1)
                .bind(lo)
                .bind(hi)
                .bind(SQLITE_EVENT_ROWS_PER_PAGE)
                .fetch_all(&mut *snapshot)
                .await?;
            let last_page = page.len() < SQLITE_EVENT_ROWS_PER_PAGE as usize;
            // Decompressing and parsing a page is CPU work: off the async workers.
            let done;
            (found, after, done) = tokio::task::spawn_blocking(move || {
                for (id, first_ms, encoding, lines) in page {
                    if !found.wants(first_ms) {
                        return Ok((found, after, true));
                    }
                    found.add(id, first_ms, &audit::decode(id, &encoding, lines)?);
                    after = (first_ms, id);
                }
                Ok::<_, StoreError>((found, after, false))
            })
            .await??;
            if done || last_page {
                break;
            }
        }
        snapshot.rollback().await?;
        if found.unreadable() > 0 {
            tracing::warn!(
                lines = found.unreadable(),
                "audit log lines that are not an event's JSON, returned at their batch's time"
            );
        }
        Ok(found.finish())
    }

    async fn delete_events(&self, before_ms: i64) -> Result<u64, StoreError> {
        let counts: Vec<i64> = sqlx::query_scalar(SQLITE_PRUNE_EVENT_ROWS)
            .bind(before_ms)
            .fetch_all(&self.pool)
            .await?;
        Ok(counts.iter().map(|&n| n.max(0) as u64).sum())
    }
}

impl PostgresStore {
    async fn write_events(&self, events: Arc<[StoredEvent]>) -> Result<(), StoreError> {
        // One statement: the batch is stored whole or not at all.
        sqlx::query(PG_INSERT_EVENTS)
            .bind(bulk_events(&events)?)
            .execute(&self.bulk)
            .await?;
        Ok(())
    }

    async fn read_events(&self, f: &EventFilter) -> Result<Vec<(i64, i64, String)>, StoreError> {
        Ok(sqlx::query_as(PG_SELECT_EVENTS)
            .bind(f.after.0)
            .bind(f.since_ms.unwrap_or(i64::MIN))
            .bind(f.until_ms.unwrap_or(i64::MAX))
            .bind(&f.subject)
            .bind(&f.session_id)
            .bind(&f.decision)
            .bind(f.limit)
            .bind(f.after.1)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn delete_events(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(PG_PRUNE_EVENTS)
            .bind(before_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // These connections checkpoint at 40 MB of WAL rather than 4 MB, so a page
            // of sightings rewritten every second is copied back less often while no
            // events are written; while they are, the audit writer checkpoints at 4 MB
            // (`EventLog::open`) and runs nearly every checkpoint.
            .pragma("wal_autocheckpoint", "10000")
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let folder = options.get_filename().parent().map(|p| p.to_owned());
        if let Some(folder) = folder.filter(|f| !f.as_os_str().is_empty()) {
            std::fs::create_dir_all(&folder).map_err(|source| StoreError::Folder {
                path: folder.display().to_string(),
                source,
            })?;
        }
        let pool = SqlitePoolOptions::new()
            // An embedded database has no connection to lose: a ping before every
            // acquire would only cost a round trip to the connection's thread.
            .test_before_acquire(false)
            .max_connections(4)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.clone())
            .await?;
        let path = options.get_filename().to_owned();
        let bulk = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.pragma("cache_size", "-32768"))
            .await?;
        let events = EventLog::open(path).await?;
        Ok(Self { pool, bulk, events })
    }
}

/// Shared by several nodes.
pub struct PostgresStore {
    pool: PgPool,
    /// The same pool: PostgreSQL has no per-connection page cache to keep warm.
    bulk: PgPool,
}

/// A dedicated connection that LISTENs for change notifications. `application_name`
/// shows in `pg_stat_activity`, so operators (and tests) can find it.
pub async fn change_listener(
    url: &str,
    application_name: &str,
) -> Result<sqlx::postgres::PgListener, StoreError> {
    let options =
        sqlx::postgres::PgConnectOptions::from_str(url)?.application_name(application_name);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(options)
        .await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
    listener.listen(CHANGE_CHANNEL).await?;
    Ok(listener)
}

impl PostgresStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            // Connections kept open even when idle: catching up with the change feed
            // after a lost listener must not wait on opening one, which takes seconds
            // on a loaded database server.
            .min_connections(2)
            .acquire_timeout(Duration::from_secs(3))
            .connect(url)
            .await?;
        Ok(Self {
            bulk: pool.clone(),
            pool,
        })
    }
}

sql_store!(
    SqliteStore,
    sqlx::Sqlite,
    SqlitePool,
    SQLITE,
    SQLITE_MIGRATIONS,
    "sqlite"
);
sql_store!(
    PostgresStore,
    sqlx::Postgres,
    PgPool,
    POSTGRES,
    POSTGRES_MIGRATIONS,
    "postgres"
);
