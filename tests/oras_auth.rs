//! The ORAS Python SDK (PyPI `oras`, pinned in `scripts/test`) against a real `stowage serve`
//! with authentication on, over plain HTTP and native TLS (issue 10).
//!
//! Each test starts its own server (see `tests/clients/auth_setup.rs`: `alice` may do anything,
//! `bob` nothing but pull `public/**`, as anyone may) and runs `tests/clients/oras_auth.py`,
//! which uses the SDK as the README's recipe does (`auth_backend="basic"`, `login` with a config
//! file). The script's claims (digests, tags) are checked against the server directly.

#[path = "clients/auth_setup.rs"]
mod auth_setup;
mod common;

use std::ffi::OsString;

use auth_setup::{Driven, Setup, assert_refused, summary};

/// Runs `oras_auth.py <mode> <host> <workdir> <user> <secret> <repo>`; over TLS the SDK is
/// given the server's CA (`tls_verify=<path>`).
fn oras(s: &Setup, mode: &str, user: &str, secret: &str, repo: &str) -> Driven {
    let mut envs: Vec<(&str, OsString)> = Vec::new();
    if let Some(ca) = &s.ca {
        envs.push(("ORAS_TEST_CA", ca.into()));
    }
    s.driver("oras_auth.py", "oras", &[mode, user, secret, repo], &envs)
}

/// Login, push, pull (digest unchanged), tag list, delete, logout, as `user` with `secret`;
/// the script's digests and tags are cross-checked against the server.
async fn round_trip(s: &Setup, user: &str, secret: &str, repo: &str) {
    let run = oras(s, "roundtrip", user, secret, repo);
    assert_eq!(run.code, Some(0), "oras_auth.py roundtrip failed:\n{}", run.text);
    let summary = summary(&run, "ORAS_AUTH_OK ");
    let (served, tags) = s.served(repo, "v1").await;
    assert_eq!(
        summary["pushed"],
        served.as_str(),
        "the SDK reports the digest Stowage serves"
    );
    assert_eq!(
        summary["pulled"],
        served.as_str(),
        "the pulled digest is the pushed one"
    );
    assert_eq!(summary["tags_before"], serde_json::json!(["v1", "v2"]));
    assert_eq!(summary["tags_after"], serde_json::json!(["v1"]));
    assert_eq!(tags, ["v1"], "the deleted tag is gone on the server too");
}

/// A push that must be refused at once, with `message` in what the user sees (the SDK raises
/// an exception whose text holds the error body).
fn refused_push(s: &Setup, user: &str, secret: &str, repo: &str, message: &str) {
    let run = oras(s, "push", user, secret, repo);
    assert_refused(&run, "ORAS_PUSH_REFUSED", message);
}

#[tokio::test]
async fn login_push_pull_tags_delete_logout_with_a_password() {
    let s = Setup::start(false);
    round_trip(&s, "alice", "alice-pw", "demo/oras").await;
}

#[tokio::test]
async fn login_push_pull_tags_delete_logout_with_an_api_token() {
    let s = Setup::start(false);
    let token = s.token("alice", "oras", "demo/**:pull,push,delete");
    round_trip(&s, "ci", &token, "demo/oras-token").await;
}

#[tokio::test]
async fn login_push_pull_tags_delete_logout_over_native_tls() {
    let s = Setup::start(true);
    round_trip(&s, "alice", "alice-pw", "demo/oras-tls").await;
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_stowage_s_message() {
    let s = Setup::start(false);
    refused_push(
        &s,
        "alice",
        "not-the-password",
        "demo/oras",
        "wrong user name or password",
    );
}

#[tokio::test]
async fn a_token_for_another_repository_is_refused_on_push_with_its_message() {
    let s = Setup::start(false);
    let token = s.token("alice", "other", "other/**:pull,push");
    refused_push(
        &s,
        "alice",
        &token,
        "demo/oras",
        "the API token's scopes do not grant push on repository demo/oras",
    );
}

#[tokio::test]
async fn a_revoked_api_token_is_refused_saying_so() {
    let s = Setup::start(false);
    let token = s.token("alice", "gone", "demo/**:pull,push");
    s.revoke("alice", "gone");
    refused_push(
        &s,
        "alice",
        &token,
        "demo/oras",
        r#"the API token "gone" of user alice has been revoked"#,
    );
}

#[tokio::test]
async fn a_user_without_push_rights_is_refused_with_the_reason() {
    let s = Setup::start(false);
    refused_push(
        &s,
        "bob",
        "bob-pw",
        "demo/oras",
        "user bob may not push on repository demo/oras",
    );
}

#[tokio::test]
async fn anonymous_pull_of_an_anonymous_pull_repository() {
    let s = Setup::start(false);
    let run = oras(&s, "anonymous", "alice", "alice-pw", "public/oras");
    assert_eq!(run.code, Some(0), "oras_auth.py anonymous failed:\n{}", run.text);
    assert!(run.stdout.contains("ORAS_ANONYMOUS_OK"), "{}", run.text);
    let (_, tags) = s.served("public/oras", "v1").await;
    assert_eq!(tags, ["v1"]);
}
