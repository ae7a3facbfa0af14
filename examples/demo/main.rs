//! The whole product in five minutes: `cargo run --example demo`, then open
//! http://127.0.0.1:8000 and sign in as alice / correct horse battery staple.
//!
//! It starts three things on loopback: tokenwarden (SQLite under `target/demo`,
//! MaxMind's test GeoIP databases, `rules/default.toml`), the demo app
//! (`examples/demo/app.rs`) and nginx (Debian `nginx-light`) in front of both with
//! `examples/demo/nginx.conf`. Then play the thief from another continent with the
//! token cookie your browser holds (see the README's demo section):
//!
//! ```text
//! curl -i http://127.0.0.1:8000/orders -H 'X-Demo-From: 216.160.83.56' \
//!      -H "Cookie: tw_at=<the cookie>" -H "User-Agent: <your browser's>"
//! ```
//!
//! and reload a page in the browser: it asks you to confirm it's you, and says why.

mod app;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::Context;
use tokenwarden::clock::SystemClock;
use tokenwarden::config::{FileConfig, Settings, TokensSection};
use tokenwarden::http::Application;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// tokenwarden as the demo runs it.
pub fn settings(data: &Path, app_key: &str) -> anyhow::Result<Settings> {
    let file = FileConfig {
        data_dir: Some(data.to_owned()),
        geoip_city: Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb")),
        geoip_asn: Some(repo("tests/data/geoip/GeoLite2-ASN-Test.mmdb")),
        rules: Some(repo("rules/default.toml")),
        trusted_proxies: Some(vec!["127.0.0.1/32".parse()?]),
        tokens: TokensSection {
            access_ttl: Some("15m".into()),
            ..TokensSection::default()
        },
        ..FileConfig::default()
    };
    let env: BTreeMap<String, String> = [
        ("TOKENWARDEN_LISTEN", "127.0.0.1:0".to_owned()),
        ("TOKENWARDEN_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("TOKENWARDEN_APP_KEYS", format!("demo:{app_key}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut settings = Settings::resolve(file, &env)?;
    settings.forward_auth.cookie = Some(app::COOKIE.into());
    settings.forward_auth.reauth_url = Some("/reauth".into());
    settings.forward_auth.login_url = Some("/login".into());
    Ok(settings)
}

fn nginx() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("tokenwarden=info")
        .init();
    let port: u16 = std::env::args()
        .nth(1)
        .map(|p| p.parse())
        .transpose()
        .context("usage: cargo run --example demo [port]")?
        .unwrap_or(8000);
    let nginx = nginx().context("the demo runs nginx in front: apt-get install nginx-light")?;

    let data = repo("target/demo");
    std::fs::create_dir_all(data.join("nginx"))?;
    let app_key = tokenwarden::config::to_hex(&tokenwarden::token::random_bytes::<32>()?);
    let tw = Application::build(&settings(&data, &app_key)?, Arc::new(SystemClock)).await?;
    let tw_addr = tw.public_addr()?;
    tokio::spawn(tw.run_until_stopped(async {
        let _ = tokio::signal::ctrl_c().await;
    }));

    let demo = app::Demo {
        tokenwarden: format!("http://{tw_addr}"),
        app_key,
        http: reqwest::Client::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app::router(demo)).await });

    let conf = data.join("nginx/nginx.conf");
    std::fs::write(
        &conf,
        std::fs::read_to_string(repo("examples/demo/nginx.conf"))?
            .replace("@PORT@", &port.to_string())
            .replace("@TOKENWARDEN@", &tw_addr.to_string())
            .replace("@APP@", &app_addr.to_string())
            .replace("@DIR@", &data.join("nginx").display().to_string()),
    )?;
    let mut proxy = Command::new(nginx)
        .args(["-e", "stderr", "-p"])
        .arg(data.join("nginx"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .spawn()
        .context("start nginx")?;
    println!(
        "\nDemo Bank: http://127.0.0.1:{port}  (alice / correct horse battery staple)\n\
         tokenwarden: http://{tw_addr}  ·  Ctrl-C stops everything\n"
    );
    tokio::signal::ctrl_c().await?;
    let _ = proxy.kill();
    let _ = proxy.wait();
    Ok(())
}
