//! The end user's experience, in a real headless Chromium (Debian `chromium` and
//! `chromium-driver`, driven over WebDriver): sign in to the demo app behind real
//! nginx and tokenwarden, browse, have the token stolen and used from another
//! continent, be asked to confirm with the honest reason, re-enter the password
//! and carry on — while the thief's copy is refused. Screenshots of each step are
//! saved under `target/screenshots/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::support::{APP_KEY, Fixture, KillOnDrop, TestApp, free_port, settings};

#[path = "../../examples/demo/app.rs"]
mod demo_app;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const NGINX: &str = "/usr/sbin/nginx";

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Chromium, its driver and nginx, or a loud failure in CI (a loud skip elsewhere).
fn tools_present() -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER, NGINX]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("TOKENWARDEN_TEST_REQUIRE_BROWSER").is_some() {
        panic!(
            "{missing:?} missing: the browser test needs Debian chromium, chromium-driver and nginx-light (.ci/run installs them)"
        );
    }
    eprintln!(
        "\n*** SKIPPED: browser test; {missing:?} not installed (apt-get install chromium chromium-driver nginx-light).\n"
    );
    false
}

struct Screenshots(PathBuf);

impl Screenshots {
    fn new() -> Self {
        let dir = repo("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    async fn take(&self, c: &Client, name: &str) {
        let png = c.screenshot().await.unwrap();
        std::fs::write(self.0.join(format!("{name}.png")), png).unwrap();
    }
}

async fn text_of(c: &Client, id: &str) -> String {
    let found = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id(id))
        .await;
    match found {
        Ok(e) => e.text().await.unwrap(),
        Err(e) => panic!(
            "#{id} not on {:?}: {e}\n{}",
            c.current_url().await,
            c.source().await.unwrap_or_default()
        ),
    }
}

#[tokio::test]
async fn a_user_is_asked_to_confirm_with_the_honest_reason_and_the_thief_is_shut_out() {
    if !tools_present() {
        return;
    }
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    config.geoip_asn = Some(repo("tests/data/geoip/GeoLite2-ASN-Test.mmdb"));
    config.rules = Some(repo("rules/default.toml"));
    config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    config.forward_auth.cookie = Some(demo_app::COOKIE.into());
    config.forward_auth.reauth_url = Some("/reauth".into());
    config.forward_auth.login_url = Some("/login".into());
    let tw = TestApp::spawn(config).await;

    let demo = demo_app::Demo {
        tokenwarden: tw.base.clone(),
        app_key: APP_KEY.into(),
        http: reqwest::Client::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, demo_app::router(demo)).await });

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tw_addr: SocketAddr = tw.base.trim_start_matches("http://").parse().unwrap();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        std::fs::read_to_string(repo("examples/demo/nginx.conf"))
            .unwrap()
            .replace("@PORT@", &port.to_string())
            .replace("@TOKENWARDEN@", &tw_addr.to_string())
            .replace("@APP@", &app_addr.to_string())
            .replace("@DIR@", &dir.path().display().to_string()),
    )
    .unwrap();
    let _nginx = KillOnDrop(
        Command::new(NGINX)
            .args(["-e", "stderr", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let driver_port = free_port();
    let _driver = KillOnDrop(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let gate = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let start = Instant::now();
    while http.get(format!("{gate}/login")).send().await.is_err()
        || http
            .get(format!("http://127.0.0.1:{driver_port}/status"))
            .send()
            .await
            .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nginx or chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,760", format!("--user-data-dir={}", profile.path().display())],
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .expect("a Chromium session");
    let shots = Screenshots::new();

    // Not signed in: nginx sends the browser to the sign-in page, and back after.
    c.goto(&format!("{gate}/orders")).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/login");
    c.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys(demo_app::USERS[0].1)
        .await
        .unwrap();
    shots.take(&c, "1-sign-in").await;
    c.find(Locator::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(text_of(&c, "who").await.contains("alice"));
    assert_eq!(c.current_url().await.unwrap().path(), "/orders");
    c.goto(&format!("{gate}/account")).await.unwrap();
    assert_eq!(text_of(&c, "title").await, "Your account");
    shots.take(&c, "2-browsing").await;

    // The token cookie is stolen (malware copies the browser's user agent too) and
    // used from the United States three minutes later.
    let stolen = c.get_named_cookie(demo_app::COOKIE).await.unwrap();
    let stolen = stolen.value().to_owned();
    let ua = c
        .execute("return navigator.userAgent", vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    let thief = |path: &'static str| {
        http.get(format!("{gate}{path}"))
            .header("cookie", format!("{}={stolen}", demo_app::COOKIE))
            .header("user-agent", &ua)
            .header("x-demo-from", "216.160.83.56")
            .send()
    };
    tw.clock.advance(Duration::from_secs(180));
    let r = thief("/orders").await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_user_authentication")
    );

    // The user's next page: the prompt, with the honest reason.
    tw.clock.advance(Duration::from_secs(60));
    c.goto(&format!("{gate}/orders")).await.unwrap();
    let why = text_of(&c, "why").await;
    assert_eq!(c.current_url().await.unwrap().path(), "/reauth");
    assert!(
        why.contains("Milton") && why.contains("London"),
        "the reason names both places: {why}"
    );
    shots.take(&c, "3-confirm-its-you").await;
    c.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys(demo_app::USERS[0].1)
        .await
        .unwrap();
    c.find(Locator::Id("confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(text_of(&c, "title").await, "Orders", "back where they were");
    assert_eq!(c.current_url().await.unwrap().path(), "/orders");
    c.goto(&format!("{gate}/account")).await.unwrap();
    assert_eq!(text_of(&c, "title").await, "Your account");
    shots.take(&c, "4-carried-on").await;

    // The thief's copy died with the re-authentication.
    let r = thief("/orders").await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    c.close().await.unwrap();
}
