//! `refresh_reuse`: an already-rotated refresh token came back. Hard evidence of
//! theft; the store has already revoked the session, and the rule's action can
//! widen that (e.g. `revoke_user`).

use super::hit;
use crate::risk::rules::RefreshReuse;
use crate::risk::{Hit, RequestContext};

pub fn evaluate(_p: &RefreshReuse, ctx: &RequestContext<'_>) -> Option<Hit> {
    ctx.refresh_reused.then(|| {
        hit(
            ctx,
            "an already-rotated refresh token was presented".to_owned(),
        )
    })
}
