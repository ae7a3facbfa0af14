//! Interoperability with PyJWT, a widely used JWT library in another language:
//! what it mints with our keys we accept, and what it would reject we reject.
//! The test installs PyJWT into `target/pyjwt-venv` from PyPI when it is missing.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{Fixture, T0, TestApp, s, settings};
use crate::tokens::flip_char;

const PYJWT: &str = "PyJWT[crypto]==2.10.1";

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pyjwt-venv");
    let py = venv.join("bin/python");
    let ready = py.exists()
        && Command::new(&py)
            .args(["-c", "import jwt, cryptography"])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let status = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .expect("python3 is required for the PyJWT interoperability test");
        assert!(
            status.success(),
            "python3 -m venv failed: install python3-venv"
        );
        let status = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                PYJWT,
            ])
            .status()
            .expect("pip");
        assert!(
            status.success(),
            "pip install {PYJWT} failed: PyPI must be reachable"
        );
    }
    py
}

const SCRIPT: &str = r#"
import json, sys, jwt
req = json.load(sys.stdin)
out = {}
for name, case in req["mint"].items():
    key = open(case["key_path"]).read()
    if case["alg"] == "HS512":
        key = key.strip().encode()
    out[name] = jwt.encode(case["claims"], key, algorithm=case["alg"], headers=case["headers"])
verdicts = {}
for name, case in req["verify"].items():
    try:
        jwt.decode(case["token"], case["key"], algorithms=[case["alg"]], audience="tokenwarden",
                   issuer="tokenwarden", options={"verify_exp": False, "verify_iat": False,
                   "require": ["exp", "iss", "aud", "sub"]})
        verdicts[name] = "accept"
    except Exception as e:
        verdicts[name] = "reject:" + type(e).__name__
json.dump({"minted": out, "verdicts": verdicts}, sys.stdout)
"#;

fn run_python(py: &PathBuf, request: &Value) -> Value {
    use std::io::Write;
    let mut child = Command::new(py)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "PyJWT script failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn tokens_minted_by_pyjwt_verify_and_its_rejections_are_ours() {
    let py = python();
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let app = TestApp::spawn(settings(&db.url, &keys, "ed-1", data.path())).await;
    let opened = app.open("alice").await;
    let ours = s(&opened, "access_token");
    let payload = ours.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["iat"], T0);

    let mut mint = serde_json::Map::new();
    for (kid, alg) in [("hs-1", "HS512"), ("es-1", "ES256"), ("ed-1", "EdDSA")] {
        mint.insert(
            kid.into(),
            json!({"alg": alg, "key_path": keys.path(kid), "claims": claims,
                   "headers": {"kid": kid, "typ": "at+jwt"}}),
        );
    }
    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("someone-else");
    mint.insert(
        "wrong_aud".into(),
        json!({"alg": "HS512", "key_path": keys.path("hs-1"), "claims": wrong_aud,
               "headers": {"kid": "hs-1", "typ": "at+jwt"}}),
    );
    let minted = run_python(&py, &json!({"mint": mint, "verify": {}}))["minted"].clone();
    for kid in ["hs-1", "es-1", "ed-1"] {
        let v = app.verify(minted[kid].as_str().unwrap()).await;
        assert_eq!(v["decision"], "allow", "PyJWT {kid} token: {v}");
    }
    assert_eq!(
        app.verify(minted["wrong_aud"].as_str().unwrap()).await["decision"],
        "invalid"
    );

    // PyJWT judges our token and tampered copies with the HS512 secret; we must agree.
    let tampered = flip_char(&ours, ours.len() - 10);
    let hs_token = minted["hs-1"].as_str().unwrap().to_owned();
    let hs_tampered = flip_char(&hs_token, hs_token.len() - 10);
    let secret = keys.read("hs-1").trim().to_owned();
    let verify = json!({
        "ok": {"token": hs_token, "key": secret, "alg": "HS512"},
        "tampered": {"token": hs_tampered, "key": secret, "alg": "HS512"},
        "wrong_aud": {"token": minted["wrong_aud"], "key": secret, "alg": "HS512"},
        "ours_tampered_as_hs": {"token": tampered, "key": secret, "alg": "HS512"},
    });
    let verdicts = run_python(&py, &json!({"mint": {}, "verify": verify}))["verdicts"].clone();
    for (name, token) in [
        ("ok", verify["ok"]["token"].as_str().unwrap()),
        ("tampered", verify["tampered"]["token"].as_str().unwrap()),
        ("wrong_aud", verify["wrong_aud"]["token"].as_str().unwrap()),
        (
            "ours_tampered_as_hs",
            verify["ours_tampered_as_hs"]["token"].as_str().unwrap(),
        ),
    ] {
        let pyjwt_accepts = verdicts[name] == "accept";
        let we_accept = app.verify(token).await["decision"] == "allow";
        assert_eq!(
            we_accept, pyjwt_accepts,
            "{name}: PyJWT says {}",
            verdicts[name]
        );
    }
    assert_eq!(verdicts["ok"], "accept");

    // Where the two differ, we are the stricter: a signature whose last base64url
    // character carries non-zero padding bits decodes to the same bytes for PyJWT
    // (Python's base64 is lenient), but is not the canonical encoding, so we refuse it.
    let mut loose = hs_token.clone();
    let last = loose.pop().unwrap();
    let idx = ALPHABET.find(last).unwrap();
    let bits_unused = match hs_token.rsplit('.').next().unwrap().len() % 4 {
        2 => 4,
        3 => 2,
        _ => 0,
    };
    assert!(
        bits_unused > 0,
        "an HS512 signature (64 bytes) leaves 4 unused bits"
    );
    loose.push(ALPHABET.as_bytes()[(idx | 1) & 63] as char);
    assert_ne!(loose, hs_token);
    let verdicts = run_python(
        &py,
        &json!({"mint": {}, "verify": {"loose": {"token": loose, "key": secret, "alg": "HS512"}}}),
    )["verdicts"]
        .clone();
    assert_eq!(
        verdicts["loose"], "accept",
        "PyJWT ignores the padding bits"
    );
    assert_eq!(app.verify(&loose).await["decision"], "invalid");
}

const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
