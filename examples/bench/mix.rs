//! The benchmark's sessions, shared by `tokens.rs` (which opens them for
//! bench/run.py) and `allocs.rs`: each session's address, browser and user.

/// The browsers sessions are opened from, one per session in turn.
pub const AGENTS: &[&str] = &[
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 15; Pixel 9) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
];

/// Session `i`'s browser.
pub fn agent(i: usize) -> &'static str {
    AGENTS[i % AGENTS.len()]
}

/// One address per session, so no address-keyed rate rule is shared: a tenth in
/// networks the MaxMind test databases place (London, Linköping, Milton), the rest
/// in documentation and private ranges they do not know.
pub fn address(i: usize) -> String {
    match i % 10 {
        0 => format!("81.2.69.{}", 142 + (i / 10) % 50),
        1 => format!("89.160.20.{}", 112 + (i / 10) % 100),
        2 => format!("216.160.83.{}", 56 + (i / 10) % 100),
        _ => format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
    }
}

/// Session `i`'s user: two sessions per user, half the sessions apart, so from
/// the same kind of network.
pub fn subject(i: usize, sessions: usize) -> String {
    format!("user-{}", i % (sessions / 2).max(1))
}
