//! Writes the benchmark's request mix against a running tokenwarden: opens N
//! sessions through the session API (each from its own address and browser),
//! logs some out (revoked tokens), mints expired and bad-signature tokens with the
//! same key file, and optionally never-seen tokens for the running sessions.
//!
//! `cargo run --release --example bench-tokens -- BASE APP_KEY KEY_FILE ALG SESSIONS COLD OUT`
//! writes OUT (warm mix) and OUT.cold (COLD never-seen valid tokens), one request
//! per line: `kind<TAB>token<TAB>ip<TAB>user agent`.

mod mix;

use std::io::Write;

use anyhow::Context;
use tokenwarden::config::{FileConfig, KeyEntry, Settings, TokensSection};
use tokenwarden::token::{KeySet, TokenCodec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, base, app_key, key_file, alg, sessions, cold, out] = &args[..] else {
        anyhow::bail!("usage: bench-tokens BASE APP_KEY KEY_FILE ALG SESSIONS COLD OUT");
    };
    let sessions: usize = sessions.parse()?;
    let cold: usize = cold.parse()?;
    let keys = KeySet::load(
        &[KeyEntry {
            kid: "bench".into(),
            alg: alg.parse().map_err(anyhow::Error::msg)?,
            path: key_file.into(),
        }],
        None,
    )?;
    let settings = Settings::resolve(
        FileConfig {
            tokens: TokensSection::default(),
            ..FileConfig::default()
        },
        &Default::default(),
    )?;
    let codec = TokenCodec::new(keys, &settings.tokens);
    let http = reqwest::Client::new();

    let mut opened = Vec::with_capacity(sessions);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sessions {
        let (http, base, key) = (http.clone(), base.clone(), app_key.clone());
        tasks.spawn(async move {
            let (ip, ua) = (mix::address(i), mix::agent(i));
            let r = http
                .post(format!("{base}/v1/sessions"))
                .bearer_auth(key)
                .json(&serde_json::json!({"subject": mix::subject(i, sessions), "client": {"ip": ip, "user_agent": ua}}))
                .send()
                .await?
                .error_for_status()?
                .json::<serde_json::Value>()
                .await?;
            anyhow::Ok((i, r))
        });
        if tasks.len() >= 32 {
            opened.push(tasks.join_next().await.context("task")???);
        }
    }
    while let Some(r) = tasks.join_next().await {
        opened.push(r??);
    }
    opened.sort_by_key(|(i, _)| *i);

    let now = tokenwarden::clock::Clock::now(&tokenwarden::clock::SystemClock);
    let mut warm = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut cold_out = std::io::BufWriter::new(std::fs::File::create(format!("{out}.cold"))?);
    let mut cold_left = cold;
    for (i, r) in &opened {
        let (ip, ua) = (mix::address(*i), mix::agent(*i));
        let token = r["access_token"].as_str().context("access_token")?;
        let claims = codec.verify(token, now).map_err(anyhow::Error::msg)?;
        // 85 % valid; 5 % each revoked (logged out), expired, bad signature.
        let (kind, line_token) = match i % 20 {
            0 => {
                http.delete(format!("{base}/v1/sessions/{}", claims.sid))
                    .bearer_auth(app_key)
                    .send()
                    .await?
                    .error_for_status()?;
                ("revoked", token.to_owned())
            }
            1 => {
                let mut c = (*claims).clone();
                c.iat = now - 3600;
                c.exp = now - 1800;
                c.jti = format!("expired-{i}");
                ("expired", codec.mint(&c).map_err(anyhow::Error::msg)?)
            }
            2 => {
                let mut t = token.to_owned().into_bytes();
                let n = t.len() - 5;
                t[n] = if t[n] == b'A' { b'B' } else { b'A' };
                ("bad_signature", String::from_utf8(t)?)
            }
            _ => ("valid", token.to_owned()),
        };
        writeln!(warm, "{kind}\t{line_token}\t{ip}\t{ua}")?;
        if kind == "valid" && cold_left > 0 {
            // Never-seen tokens of this session: same claims, a fresh jti each.
            let per = cold.div_ceil(sessions * 17 / 20).max(1).min(cold_left);
            for k in 0..per {
                let mut c = (*claims).clone();
                c.jti = format!("cold-{i}-{k}");
                writeln!(
                    cold_out,
                    "valid\t{}\t{ip}\t{ua}",
                    codec.mint(&c).map_err(anyhow::Error::msg)?
                )?;
            }
            cold_left -= per;
        }
    }
    warm.flush()?;
    cold_out.flush()?;
    eprintln!(
        "{} sessions, {} never-seen tokens written",
        opened.len(),
        cold - cold_left
    );
    Ok(())
}
