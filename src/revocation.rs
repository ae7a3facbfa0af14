//! The in-memory revocation view: what every verification checks, without a
//! database round trip. It is filled from the store at start and updated by
//! [`Change`]s after each durable write. Another node's changes can be fed in
//! through the same [`RevocationView::apply`].
//!
//! Every entry carries `until`: the latest `exp` of a token it can still refuse.
//! Past `until` plus the allowed clock skew no such token verifies anyway, so
//! the entry is dropped and memory stays bounded.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::ConcurrentMap;
use crate::clock::UnixSeconds;

/// One durable state change that verification depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    JtiRevoked {
        jti: String,
        until: UnixSeconds,
    },
    SessionRevoked {
        session_id: String,
        until: UnixSeconds,
    },
    /// The session re-authenticated: tokens of older epochs are dead.
    SessionEpoch {
        session_id: String,
        epoch: i64,
        until: UnixSeconds,
    },
    /// The user logged out everywhere: tokens of older generations are dead.
    UserGeneration {
        subject: String,
        generation: i64,
        until: UnixSeconds,
    },
    /// The rules asked this session to re-authenticate (cleared by `SessionEpoch`).
    StepUp {
        session_id: String,
        /// What the user is told until they re-authenticate (absent in older feeds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

/// Why a token is refused by the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedBy {
    Token,
    Session,
    Reauthenticated,
    User,
}

impl RevokedBy {
    pub fn code(self) -> &'static str {
        match self {
            Self::Token => "token_revoked",
            Self::Session => "session_revoked",
            Self::Reauthenticated => "session_reauthenticated",
            Self::User => "user_sessions_revoked",
        }
    }
}

/// The identifiers of a verified token that revocation can target.
#[derive(Debug, Clone, Copy)]
pub struct TokenIds<'a> {
    pub jti: &'a str,
    pub session_id: &'a str,
    pub subject: &'a str,
    pub generation: i64,
    pub epoch: i64,
}

#[derive(Debug, Default)]
pub struct RevocationView {
    jtis: ConcurrentMap<String, UnixSeconds>,
    sessions: ConcurrentMap<String, UnixSeconds>,
    epochs: ConcurrentMap<String, (i64, UnixSeconds)>,
    users: ConcurrentMap<String, (i64, UnixSeconds)>,
    /// Counts the changes applied that can refuse a token, each counted after its
    /// entry is in place: while it stands still, a token found clear stays clear.
    version: AtomicU64,
}

/// The view's version at which one verified token was last found clear (plus one;
/// zero: never). It travels with the token's claims in the verified-token cache, so
/// a token seen again since the last revocation skips the view's lookups.
#[derive(Debug, Default)]
pub struct Cleared(AtomicU64);

/// A copy has not been checked: only the claims the cache holds carry a memo.
impl Clone for Cleared {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Not part of what the claims say.
impl PartialEq for Cleared {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl RevocationView {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&self, change: Change) {
        match change {
            Change::JtiRevoked { jti, until } => {
                let mut e = self.jtis.entry(jti).or_insert(until);
                *e = (*e).max(until);
            }
            Change::SessionRevoked { session_id, until } => {
                let mut e = self.sessions.entry(session_id).or_insert(until);
                *e = (*e).max(until);
            }
            Change::SessionEpoch {
                session_id,
                epoch,
                until,
            } => {
                let mut e = self.epochs.entry(session_id).or_insert((epoch, until));
                *e = (e.0.max(epoch), e.1.max(until));
            }
            Change::UserGeneration {
                subject,
                generation,
                until,
            } => {
                let mut e = self.users.entry(subject).or_insert((generation, until));
                *e = (e.0.max(generation), e.1.max(until));
            }
            // Risk state, not revocation: the monitor handles it.
            Change::StepUp { .. } => return,
        }
        // After the entry: a check that reads the version before its lookups and finds
        // the token clear has either seen this entry or will see a newer version.
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// [`Self::check`], skipped for a token found clear since the last change that
    /// can refuse one. Entries only ever grow or are pruned once no token they
    /// refuse can verify, so a token found clear stays clear until the version moves.
    ///
    /// Sound only when `ids` are read from the claims that carry `cleared` (an id
    /// from elsewhere, such as a foreign session's recorded generation, can change
    /// without the version moving) and those claims are only ever checked against
    /// this one view (a new view starts its count again).
    pub fn check_remembered(&self, ids: TokenIds<'_>, cleared: &Cleared) -> Option<RevokedBy> {
        // Read before the lookups: a change applied during them moves it.
        let now = self.version.load(Ordering::Acquire).wrapping_add(1);
        if cleared.0.load(Ordering::Relaxed) == now {
            return None;
        }
        let revoked = self.check(ids);
        if revoked.is_none() {
            cleared.0.store(now, Ordering::Relaxed);
        }
        revoked
    }

    /// `Some(reason)` when the token must be refused.
    pub fn check(&self, ids: TokenIds<'_>) -> Option<RevokedBy> {
        // The widest revocation first, so the reason names what the user or admin did.
        if self
            .users
            .get(ids.subject)
            .is_some_and(|g| ids.generation < g.0)
        {
            return Some(RevokedBy::User);
        }
        if self.sessions.contains_key(ids.session_id) {
            return Some(RevokedBy::Session);
        }
        if self
            .epochs
            .get(ids.session_id)
            .is_some_and(|e| ids.epoch < e.0)
        {
            return Some(RevokedBy::Reauthenticated);
        }
        if self.jtis.contains_key(ids.jti) {
            return Some(RevokedBy::Token);
        }
        None
    }

    /// Drops entries no token can need any more: `until` plus `leeway` is in the past.
    pub fn prune(&self, now: UnixSeconds, leeway: i64) {
        let keep = |until: UnixSeconds| until.saturating_add(leeway) >= now;
        self.jtis.retain(|_, until| keep(*until));
        self.sessions.retain(|_, until| keep(*until));
        self.epochs.retain(|_, e| keep(e.1));
        self.users.retain(|_, g| keep(g.1));
    }

    /// Entries held, for metrics and tests.
    pub fn len(&self) -> usize {
        self.jtis.len() + self.sessions.len() + self.epochs.len() + self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<'a>(generation: i64, epoch: i64) -> TokenIds<'a> {
        TokenIds {
            jti: "j1",
            session_id: "s1",
            subject: "alice",
            generation,
            epoch,
        }
    }

    #[test]
    fn each_kind_of_change_refuses_the_tokens_it_targets() {
        let view = RevocationView::new();
        assert_eq!(view.check(ids(0, 0)), None);
        view.apply(Change::SessionEpoch {
            session_id: "s1".into(),
            epoch: 1,
            until: 100,
        });
        assert_eq!(view.check(ids(0, 0)), Some(RevokedBy::Reauthenticated));
        assert_eq!(view.check(ids(0, 1)), None);
        view.apply(Change::UserGeneration {
            subject: "alice".into(),
            generation: 2,
            until: 100,
        });
        assert_eq!(view.check(ids(1, 1)), Some(RevokedBy::User));
        assert_eq!(view.check(ids(2, 1)), None);
        view.apply(Change::JtiRevoked {
            jti: "j1".into(),
            until: 100,
        });
        assert_eq!(view.check(ids(2, 1)), Some(RevokedBy::Token));
        view.apply(Change::SessionRevoked {
            session_id: "s1".into(),
            until: 100,
        });
        assert_eq!(view.check(ids(2, 1)), Some(RevokedBy::Session));
        assert_eq!(
            view.check(ids(1, 1)),
            Some(RevokedBy::User),
            "the widest reason wins"
        );
    }

    #[test]
    fn a_token_found_clear_is_refused_by_each_later_change() {
        let changes = [
            Change::SessionEpoch {
                session_id: "s1".into(),
                epoch: 1,
                until: 100,
            },
            Change::UserGeneration {
                subject: "alice".into(),
                generation: 1,
                until: 100,
            },
            Change::JtiRevoked {
                jti: "j1".into(),
                until: 100,
            },
            Change::SessionRevoked {
                session_id: "s1".into(),
                until: 100,
            },
        ];
        for change in changes {
            let view = RevocationView::new();
            let cleared = Cleared::default();
            assert_eq!(view.check_remembered(ids(0, 0), &cleared), None);
            assert_eq!(view.check_remembered(ids(0, 0), &cleared), None);
            // Another session's change moves the version too; the token is checked again.
            view.apply(Change::JtiRevoked {
                jti: "other".into(),
                until: 100,
            });
            assert_eq!(view.check_remembered(ids(0, 0), &cleared), None);
            view.apply(change.clone());
            assert!(
                view.check_remembered(ids(0, 0), &cleared).is_some(),
                "{change:?}"
            );
            assert_eq!(
                view.check_remembered(ids(0, 0), &cleared),
                view.check(ids(0, 0)),
                "{change:?}: refused again, for the same reason"
            );
        }
    }

    #[test]
    fn a_remembered_token_skips_the_lookups_until_the_version_moves() {
        let view = RevocationView::new();
        let cleared = Cleared::default();
        assert_eq!(view.check_remembered(ids(0, 0), &cleared), None);
        // An entry put in place without counting it, as `apply` never does: only the
        // memo can explain the token passing.
        view.jtis.insert("j1".into(), 100);
        assert_eq!(view.check(ids(0, 0)), Some(RevokedBy::Token));
        assert_eq!(view.check_remembered(ids(0, 0), &cleared), None);
        assert_eq!(
            view.check_remembered(ids(0, 0), &cleared.clone()),
            Some(RevokedBy::Token),
            "a copy of the claims carries no memo"
        );
        // A step-up is not a revocation: remembered tokens stay remembered.
        view.apply(Change::StepUp {
            session_id: "s1".into(),
            message: None,
        });
        assert_eq!(view.check_remembered(ids(0, 0), &cleared), None);
        view.apply(Change::SessionEpoch {
            session_id: "s2".into(),
            epoch: 1,
            until: 100,
        });
        assert_eq!(
            view.check_remembered(ids(0, 0), &cleared),
            Some(RevokedBy::Token)
        );
    }

    #[test]
    fn generations_never_go_backwards_when_changes_arrive_out_of_order() {
        let view = RevocationView::new();
        for generation in [3, 1, 2] {
            view.apply(Change::UserGeneration {
                subject: "alice".into(),
                generation,
                until: 100,
            });
        }
        assert_eq!(view.check(ids(2, 0)), Some(RevokedBy::User));
    }

    #[test]
    fn entries_are_pruned_only_after_their_tokens_expired_plus_leeway() {
        let view = RevocationView::new();
        view.apply(Change::JtiRevoked {
            jti: "j1".into(),
            until: 100,
        });
        view.prune(130, 30);
        assert_eq!(view.len(), 1);
        view.prune(131, 30);
        assert!(view.is_empty());
    }
}
