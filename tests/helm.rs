//! Helm against a real `stowage serve` with authentication on, over plain HTTP and native TLS
//! (issue 10), through the PyPI package `helm-python-sdk` (pinned in `scripts/test`): Helm 4's
//! Go SDK behind a C ABI, so the registry code that runs is Helm's own; there is no `helm`
//! binary in Debian.
//!
//! Each test starts its own server (see `tests/clients/auth_setup.rs`: `alice` may do anything,
//! `bob` nothing but pull `public/**`, as anyone may) and runs `tests/clients/helm_auth.py`,
//! which makes and packages a small chart and drives `registry login`, `push`, `pull`, `show`,
//! `template` and `registry logout`, and an anonymous pull from `public/**`. Over TLS Helm verifies the server's certificate against the CA in `SSL_CERT_FILE` (the SDK has no
//! `--ca-file`). The script's claims (digests, tags) are checked against the server directly.

#[path = "clients/auth_setup.rs"]
mod auth_setup;
mod common;

use std::ffi::OsString;

use auth_setup::{Driven, Setup, assert_refused, summary};
use serde_json::Value;

const REPO: &str = "charts/stowage-demo";
const VERSION: &str = "0.1.0";

/// Runs `helm_auth.py <mode> <host> <workdir> <user> <secret>`.
fn helm(s: &Setup, mode: &str, user: &str, secret: &str) -> Driven {
    let mut envs: Vec<(&str, OsString)> = Vec::new();
    match &s.ca {
        Some(ca) => {
            envs.push(("HELM_TEST_CA", ca.into()));
            envs.push(("SSL_CERT_FILE", ca.into()));
        }
        None => envs.push(("SSL_CERT_FILE", OsString::new())),
    }
    s.driver("helm_auth.py", "helm_python", &[mode, user, secret], &envs)
}

/// Login, package, push, pull (archive and digests unchanged), show, template, logout, as
/// `user` with `secret`; the script's digests and tags are cross-checked against the server.
async fn round_trip(s: &Setup, user: &str, secret: &str) {
    let run = helm(s, "roundtrip", user, secret);
    assert_eq!(run.code, Some(0), "helm_auth.py roundtrip failed:\n{}", run.text);
    let summary = summary(&run, "HELM_AUTH_OK ");
    let (served, tags) = s.served(REPO, VERSION).await;
    assert_eq!(
        summary["manifest"],
        served.as_str(),
        "Helm resolves the digest Stowage serves"
    );
    assert_eq!(tags, [VERSION]);
    assert_eq!(summary["tags"], serde_json::json!([VERSION]));
    // The chart layer Stowage holds is the archive Helm pushed and pulled back.
    let manifest: Value = s
        .http()
        .get(s.server.v2(&format!("{REPO}/manifests/{VERSION}")))
        .basic_auth("alice", Some("alice-pw"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET manifest")
        .json()
        .await
        .expect("manifest JSON");
    assert_eq!(
        manifest["config"]["mediaType"], "application/vnd.cncf.helm.config.v1+json",
        "{manifest}"
    );
    let layer = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.cncf.helm.chart.content.v1.tar+gzip")
        .unwrap_or_else(|| panic!("no chart layer in {manifest}"));
    assert_eq!(
        layer["digest"], summary["chart"],
        "the pulled archive is the stored layer"
    );
    // After logout the next command is refused, saying what is missing.
    let after = summary["after_logout"].as_str().expect("after_logout");
    assert!(after.contains("authentication required: log in"), "{after}");
}

#[tokio::test]
async fn login_push_pull_show_template_logout_with_a_password() {
    let s = Setup::start(false);
    round_trip(&s, "alice", "alice-pw").await;
}

#[tokio::test]
async fn login_push_pull_show_template_logout_with_an_api_token() {
    let s = Setup::start(false);
    let token = s.token("alice", "helm", "charts/**:pull,push");
    round_trip(&s, "ci", &token).await;
}

#[tokio::test]
async fn login_push_pull_show_template_logout_over_native_tls() {
    let s = Setup::start(true);
    round_trip(&s, "alice", "alice-pw").await;
}

#[tokio::test]
async fn a_wrong_password_is_refused_at_login_with_stowage_s_message() {
    let s = Setup::start(false);
    let run = helm(&s, "login", "alice", "not-the-password");
    assert_refused(&run, "HELM_LOGIN_REFUSED", "wrong user name or password");
}

#[tokio::test]
async fn a_revoked_api_token_is_refused_at_login_saying_so() {
    let s = Setup::start(false);
    let token = s.token("alice", "gone", "charts/**:pull,push");
    s.revoke("alice", "gone");
    let run = helm(&s, "login", "alice", &token);
    assert_refused(
        &run,
        "HELM_LOGIN_REFUSED",
        r#"the API token "gone" of user alice has been revoked"#,
    );
}

/// Helm's first request of a push is a HEAD of the manifest, which needs pull: a token for
/// another repository is refused there with 403, and a HEAD response has no body to carry a
/// message, so Helm can only print the status. A token that may pull the chart's repository but
/// not push gets as far as the upload, whose refusal Helm prints with Stowage's message.
#[tokio::test]
async fn a_token_for_another_repository_is_refused_on_push() {
    let s = Setup::start(false);
    let other = s.token("alice", "other", "other/**:pull,push");
    let run = helm(&s, "push", "alice", &other);
    assert_refused(
        &run,
        "HELM_PUSH_REFUSED",
        &format!("HEAD \"http://{}/v2/{REPO}/manifests/", s.server.host),
    );
    assert!(run.text.contains("response status code 403"), "{}", run.text);

    let pull_only = s.token("alice", "pull-only", "charts/**:pull");
    let run = helm(&s, "push", "alice", &pull_only);
    assert_refused(
        &run,
        "HELM_PUSH_REFUSED",
        "403: denied: the API token's scopes do not grant push on repository charts/stowage-demo",
    );
}

#[tokio::test]
async fn a_user_without_push_rights_is_refused_on_push() {
    let s = Setup::start(false);
    let run = helm(&s, "push", "bob", "bob-pw");
    assert_refused(&run, "HELM_PUSH_REFUSED", "response status code 403");
}

#[tokio::test]
async fn anonymous_pull_of_an_anonymous_pull_repository() {
    let s = Setup::start(false);
    let run = helm(&s, "anonymous", "alice", "alice-pw");
    assert_eq!(run.code, Some(0), "helm_auth.py anonymous failed:\n{}", run.text);
    assert!(run.stdout.contains("HELM_ANONYMOUS_OK"), "{}", run.text);
    let (_, tags) = s.served(&format!("public/{REPO}"), VERSION).await;
    assert_eq!(tags, [VERSION]);
}
