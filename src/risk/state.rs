//! What the engine remembers between requests: per session (binding, recent
//! requests, decayed risk, step-up flag) and per user (last request anywhere,
//! bounded history of countries and ASNs). [`assess`] runs the engine on a
//! session's state and folds the result back in; callers persist what must be
//! durable (step-up, revocations).

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::rate::SessionQuotas;
use super::{
    Decision, Evaluation, Observation, RateLimiters, RequestContext, RuleSet, SessionView, evaluate,
};
use crate::enrich::ClientInfo;

/// Requests remembered per session (concurrent-use window).
pub const RECENT_PER_SESSION: usize = 8;
/// Countries and ASNs remembered per user.
pub const HISTORY_PER_USER: usize = 16;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    /// Shared with the user's entry in the live monitor.
    pub subject: Arc<str>,
    /// Shared with the observations that saw the same client.
    pub binding: Option<Arc<ClientInfo>>,
    pub recent: VecDeque<Observation>,
    pub risk: f64,
    pub risk_at_ms: i64,
    pub step_up: bool,
    /// The user message of the decision that asked for re-authentication: what the
    /// user is told on every request until they re-authenticate.
    #[serde(default)]
    pub step_up_message: Option<Box<str>>,
    /// The last request that was let through (or the sign-in): where the session's
    /// owner was last seen for sure. Refused requests never move it, so a thief's
    /// request from afar does not make the owner's next request look like travel.
    #[serde(default)]
    pub last_allowed: Option<Observation>,
    /// The user's generation when the session was opened (its record's), for tokens
    /// that do not carry one (another issuer's).
    #[serde(default)]
    pub user_generation: i64,
    /// The latest access-token expiry the store knows for the session (another
    /// issuer's sessions raise it as new tokens of theirs appear).
    #[serde(default)]
    pub access_exp_max: i64,
    /// A request was scored since the store last received the session's last
    /// sighting (written behind on the next heartbeat).
    #[serde(default)]
    pub unsaved: bool,
    /// The generation of the GeoIP databases that enriched the latest of `recent`
    /// (none until the live monitor enriched one): while it holds, a request from
    /// the same address and browser reuses that enrichment.
    #[serde(skip)]
    pub enriched_by: Option<std::num::NonZeroU64>,
    /// The session's quotas of `sid` rate rules (in memory only: a session loaded
    /// again starts them afresh).
    #[serde(skip)]
    pub quotas: SessionQuotas,
}

impl SessionState {
    pub fn new(subject: &str, binding: Option<ClientInfo>) -> Self {
        Self {
            subject: Arc::from(subject),
            binding: binding.map(Arc::new),
            ..Self::default()
        }
    }

    /// A session just opened: its binding is also its first sighting (velocity
    /// and concurrent-use checks start from the sign-in).
    pub fn opened(subject: &str, binding: ClientInfo, at_ms: i64) -> Self {
        let binding = Arc::new(binding);
        let mut s = Self::new(subject, None);
        s.binding = Some(Arc::clone(&binding));
        s.allowed(Observation {
            at_ms,
            client: binding,
        });
        s
    }

    /// After re-authentication: new binding, risk and step-up cleared, history kept.
    pub fn rebind(&mut self, binding: ClientInfo, at_ms: i64) {
        let binding = Arc::new(binding);
        self.binding = Some(Arc::clone(&binding));
        self.risk = 0.0;
        self.risk_at_ms = at_ms;
        self.step_up = false;
        self.step_up_message = None;
        // The new binding's enrichment is not known to be current.
        self.enriched_by = None;
        self.allowed(Observation {
            at_ms,
            client: binding,
        });
    }

    /// A request that was let through: remembered, and the new last sure sighting.
    pub fn allowed(&mut self, observation: Observation) {
        self.last_allowed = Some(observation.clone());
        self.remember(observation);
    }

    fn remember(&mut self, observation: Observation) {
        if self.recent.len() == RECENT_PER_SESSION {
            self.recent.pop_front();
        }
        self.recent.push_back(observation);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    pub last: Option<Observation>,
    pub countries: VecDeque<Arc<str>>,
    pub asns: VecDeque<u32>,
}

impl UserState {
    /// Remembers where the user legitimately is (bounded; oldest forgotten first).
    pub fn learn(&mut self, client: &ClientInfo) {
        if let Some(c) = &client.country
            && !self.countries.contains(c)
        {
            if self.countries.len() == HISTORY_PER_USER {
                self.countries.pop_front();
            }
            self.countries.push_back(c.clone());
        }
        if let Some(a) = client.asn
            && !self.asns.contains(&a)
        {
            if self.asns.len() == HISTORY_PER_USER {
                self.asns.pop_front();
            }
            self.asns.push_back(a);
        }
    }
}

impl UserState {
    /// The user signed in (session opened or re-authenticated): where that happened
    /// is known-good, and it is the user's latest request.
    pub fn signed_in(&mut self, session: &SessionState) {
        if let Some(obs) = &session.last_allowed {
            self.learn(&obs.client);
            self.last = Some(obs.clone());
        }
    }
}

/// Scores the request against the session and user state, then updates both.
pub fn assess(
    rules: &RuleSet,
    limiters: &RateLimiters,
    ctx: &RequestContext<'_>,
    session: &mut SessionState,
    user: &mut UserState,
) -> Evaluation {
    session.recent.make_contiguous();
    user.countries.make_contiguous();
    user.asns.make_contiguous();
    let evaluation = {
        let recent = session.recent.as_slices().0;
        let view = SessionView {
            binding: session.binding.as_deref(),
            last: session.last_allowed.as_ref(),
            user_last: user.last.as_ref(),
            recent,
            known_countries: user.countries.as_slices().0,
            known_asns: user.asns.as_slices().0,
            risk: session.risk,
            risk_at_ms: session.risk_at_ms,
            step_up: session.step_up,
            step_up_message: session.step_up_message.as_deref(),
        };
        evaluate(rules, limiters, ctx, &view, &mut session.quotas)
    };
    session.risk = evaluation.session_risk;
    session.risk_at_ms = ctx.at_ms;
    if evaluation.decision == Decision::StepUp && !session.step_up {
        session.step_up = true;
        session.step_up_message = evaluation.user_message.as_deref().map(Box::from);
    }
    let observation = Observation {
        at_ms: ctx.at_ms,
        client: Arc::clone(ctx.client),
    };
    // Only requests we let through say where the user is: a refused request is
    // remembered (concurrent use sees it) but is nobody's new baseline.
    if evaluation.decision == Decision::Allow {
        user.learn(ctx.client);
        user.last = Some(observation.clone());
        session.allowed(observation);
    } else {
        session.remember(observation);
    }
    evaluation
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::clock::ManualClock;
    use crate::risk::decayed_risk;
    use crate::risk::detectors::fixtures::*;

    #[test]
    fn a_sessions_state_with_its_quota_is_no_larger_than_before_it() {
        // Boxed in the live monitor, a million sessions within 1 KiB each
        // (BENCHMARKS.md): the session's `sid` quota (16 bytes) took the room of
        // what was shortened for it (`enriched_by`, `step_up_message`), so the
        // state is 152 bytes, as before the quota moved into it.
        assert_eq!(std::mem::size_of::<SessionQuotas>(), 16);
        assert!(
            std::mem::size_of::<SessionState>() <= 152,
            "{} bytes",
            std::mem::size_of::<SessionState>()
        );
    }

    fn rules() -> RuleSet {
        RuleSet::parse(
            "t",
            r#"
            [settings]
            risk_half_life = "10m"
            [thresholds]
            step_up = 40
            revoke = 80
            [[rule]]
            id = "country"
            points = 50
            message = "Activity from {city}, {country} {minutes} minutes after {prev_city}."
            ip_binding = { tier = "country" }
            [[rule]]
            id = "travel"
            points = 40
            mode = "shadow"
            geo_velocity = {}
            "#,
        )
        .unwrap()
    }

    #[test]
    fn a_stolen_token_abroad_steps_up_then_revokes_and_shadow_rules_only_report() {
        let clock = Arc::new(ManualClock::at(1_800_000_000));
        let limiters = RateLimiters::new(clock, 100);
        let rules = rules();
        let (home, thief) = (oslo(), lagos());
        let mut s = SessionState::new("alice", Some(ClientInfo::clone(&home)));
        let mut u = UserState::default();
        let e = assess(&rules, &limiters, &ctx(&home, 0), &mut s, &mut u);
        assert_eq!(e.decision, Decision::Allow);
        let e = assess(&rules, &limiters, &ctx(&thief, 120_000), &mut s, &mut u);
        assert_eq!(e.decision, Decision::StepUp);
        assert_eq!(e.score, 50, "the shadow rule's points do not count");
        assert_eq!(
            e.shadow_decision,
            Decision::Revoke,
            "with the shadow rule it would revoke"
        );
        assert!(
            e.reasons
                .iter()
                .any(|r| r.rule == "travel" && r.mode == crate::risk::ReasonMode::Shadow)
        );
        assert_eq!(
            e.user_message.as_deref(),
            Some("Activity from Lagos, NG 2 minutes after Oslo.")
        );
        assert!(s.step_up);
        let e = assess(&rules, &limiters, &ctx(&thief, 180_000), &mut s, &mut u);
        assert_eq!(
            e.decision,
            Decision::Revoke,
            "risk accumulates: {}",
            e.session_risk
        );
        assert_eq!(
            u.countries,
            [std::sync::Arc::from("NO")],
            "the thief's country was not learned"
        );
    }

    #[test]
    fn step_up_sticks_until_rebind() {
        let clock = Arc::new(ManualClock::at(1_800_000_000));
        let limiters = RateLimiters::new(clock, 100);
        let rules = rules();
        let home = oslo();
        let mut s = SessionState::new("alice", Some(ClientInfo::clone(&home)));
        s.step_up = true;
        let mut u = UserState::default();
        assert_eq!(
            assess(&rules, &limiters, &ctx(&home, 0), &mut s, &mut u).decision,
            Decision::StepUp
        );
        s.rebind(ClientInfo::clone(&home), 0);
        assert_eq!(
            assess(&rules, &limiters, &ctx(&home, 1), &mut s, &mut u).decision,
            Decision::Allow
        );
    }

    proptest! {
        #[test]
        fn risk_is_never_negative_and_only_decays(
            risk in -10.0f64..1e6, t0 in 0i64..1_000_000_000, dt1 in 0i64..1_000_000_000, dt2 in 0i64..1_000_000_000,
            half_life in 1.0f64..1e6,
        ) {
            let r1 = decayed_risk(risk, t0, t0 + dt1, half_life);
            let r2 = decayed_risk(risk, t0, t0 + dt1 + dt2, half_life);
            prop_assert!(r1 >= 0.0 && r2 >= 0.0);
            prop_assert!(r2 <= r1);
            prop_assert!(r1 <= risk.max(0.0));
        }
    }
}
