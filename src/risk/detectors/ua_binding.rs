//! `ua_binding`: the user-agent fingerprint (browser family, major version, OS
//! and, by default, device class) differs from the binding. Minor browser
//! updates keep the fingerprint, so they never fire.

use super::hit;
use crate::risk::rules::UaBinding;
use crate::risk::{Hit, RequestContext, SessionView};

pub fn evaluate(p: &UaBinding, ctx: &RequestContext<'_>, view: &SessionView<'_>) -> Option<Hit> {
    let bound = &view.binding?.ua;
    let now = &ctx.client.ua;
    let differs = bound.family != now.family
        || bound.major != now.major
        || bound.os != now.os
        || (p.device_class && bound.device != now.device);
    differs.then(|| {
        hit(
            ctx,
            format!(
                "user agent {} differs from bound {}",
                now.key(),
                bound.key()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::DeviceClass;
    use crate::risk::detectors::fixtures::*;
    use std::sync::Arc;

    #[test]
    fn fires_on_a_new_browser_major_or_device_but_not_on_the_same_one() {
        let home = oslo();
        let p = UaBinding { device_class: true };
        assert!(evaluate(&p, &ctx(&home, 0), &view(&home, None)).is_none());
        let mut upgraded = oslo();
        Arc::make_mut(&mut Arc::make_mut(&mut upgraded).ua).major = Some("134".into());
        assert!(evaluate(&p, &ctx(&upgraded, 0), &view(&home, None)).is_some());
        let mut phone = oslo();
        Arc::make_mut(&mut Arc::make_mut(&mut phone).ua).device = DeviceClass::Mobile;
        assert!(evaluate(&p, &ctx(&phone, 0), &view(&home, None)).is_some());
        let lenient = UaBinding {
            device_class: false,
        };
        assert!(evaluate(&lenient, &ctx(&phone, 0), &view(&home, None)).is_none());
    }
}
