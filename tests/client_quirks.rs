//! Real clients' odd but real habits against a server with authentication on (issue 10):
//!
//! - Homebrew sends `Authorization: Bearer QQ==` (not a token at all) for anonymous pulls; a
//!   repository anyone may pull must answer it like an anonymous request.
//! - rattler/pixi ask `GET /token?scope=…` with no `service` and no credentials, and expect an
//!   anonymous token for what anonymous clients may pull.
//! - A refusal says who may not do what: docker prints a 403's message only when it differs
//!   from the default text, and otherwise retries the push for about 50 s.
//! - A cross-repository mount whose token lacks pull on the source is challenged with both
//!   scopes (the source's pull and the target's push), so a client that takes its scopes from
//!   the challenge can get a token that mounts.

mod common;

use common::{TestServer, client, run_cli, sha256};

const CONFIG: &str = r#"
[auth]
enabled = true
anonymous_pull = ["public/**"]

[[auth.rules]]
repositories = ["team/**", "public/**", "private/**"]
users = ["*"]
actions = ["pull", "push"]

[[auth.rules]]
repositories = ["readonly/**"]
users = ["*"]
actions = ["pull"]
"#;

struct Server {
    server: TestServer,
    _config: tempfile::TempDir,
}

fn start() -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("stowage.toml");
    std::fs::write(&path, CONFIG).expect("write config");
    let server = TestServer::start_with(&[
        ("STOWAGE_CONFIG", path.to_str().expect("utf-8 path")),
        ("STOWAGE_AUTH__ENABLED", "true"),
    ]);
    run_cli(server.data_dir(), &["user", "add", "alice"], "alice-pw\n");
    Server { server, _config: dir }
}

/// Pushes a one-layer image with alice's password; returns the manifest digest.
async fn push(s: &Server, repo: &str, layer: &[u8]) -> String {
    let http = client();
    let config: &[u8] = br#"{"architecture":"amd64","os":"linux"}"#;
    let (digest, config_digest) = (sha256(layer), sha256(config));
    for (blob, blob_digest) in [(layer, &digest), (config, &config_digest)] {
        let resp = http
            .post(s.server.v2(&format!("{repo}/blobs/uploads/?digest={blob_digest}")))
            .basic_auth("alice", Some("alice-pw"))
            .body(blob.to_vec())
            .send()
            .await
            .expect("POST blob");
        assert_eq!(resp.status(), 201, "push blob {blob_digest}");
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": layer.len()}],
    });
    let body = serde_json::to_vec(&manifest).expect("manifest");
    let resp = http
        .put(s.server.v2(&format!("{repo}/manifests/v1")))
        .basic_auth("alice", Some("alice-pw"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(body.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(resp.status(), 201, "push manifest");
    sha256(&body)
}

#[tokio::test]
async fn homebrews_placeholder_bearer_pulls_like_an_anonymous_client() {
    let s = start();
    let digest = push(&s, "public/tool", b"bottle").await;
    let http = client();
    let resp = http
        .get(s.server.v2("public/tool/manifests/v1"))
        .header("Authorization", "Bearer QQ==")
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200, "an anonymous_pull repository answers Bearer QQ==");
    assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
    // Elsewhere it is an anonymous request: challenged, not refused as a bad token.
    push(&s, "private/tool", b"secret").await;
    let resp = http
        .get(s.server.v2("private/tool/manifests/v1"))
        .header("Authorization", "Bearer QQ==")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii").to_owned();
    assert!(!challenge.contains("invalid_token"), "{challenge}");
}

#[tokio::test]
async fn a_token_request_without_service_or_credentials_gets_an_anonymous_pull_token() {
    let s = start();
    push(&s, "public/pkg", b"conda").await;
    let http = client();
    let resp = http
        .get(format!("{}/token", s.server.url))
        .query(&[("scope", "repository:public/pkg:pull")])
        .send()
        .await
        .expect("token");
    assert_eq!(resp.status(), 200, "rattler's token request");
    let json: serde_json::Value = resp.json().await.expect("json");
    let token = json["token"].as_str().expect("token").to_owned();
    let resp = http
        .get(s.server.v2("public/pkg/manifests/v1"))
        .bearer_auth(&token)
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_mount_the_token_cannot_read_is_challenged_with_both_scopes() {
    let s = start();
    let layer = b"shared layer";
    push(&s, "team/base", layer).await;
    let digest = sha256(layer);
    let http = client();
    let token_for = |scope: &'static str| {
        let http = http.clone();
        let url = format!("{}/token", s.server.url);
        async move {
            let resp = http
                .get(url)
                .basic_auth("alice", Some("alice-pw"))
                .query(&[("service", "stowage"), ("scope", scope)])
                .send()
                .await
                .expect("token");
            assert_eq!(resp.status(), 200);
            let json: serde_json::Value = resp.json().await.expect("json");
            json["token"].as_str().expect("token").to_owned()
        }
    };
    let push_only = token_for("repository:team/app:pull,push").await;
    let mount = s
        .server
        .v2(&format!("team/app/blobs/uploads/?mount={digest}&from=team/base"));
    let resp = http.post(&mount).bearer_auth(&push_only).send().await.expect("POST");
    assert_eq!(resp.status(), 401, "a mount the token cannot read is challenged");
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii").to_owned();
    assert!(
        challenge.contains("repository:team/base:pull") && challenge.contains("repository:team/app:pull,push"),
        "both scopes: {challenge}"
    );
    // A token for both scopes mounts.
    let resp = http
        .get(format!("{}/token", s.server.url))
        .basic_auth("alice", Some("alice-pw"))
        .query(&[
            ("service", "stowage"),
            ("scope", "repository:team/base:pull"),
            ("scope", "repository:team/app:pull,push"),
        ])
        .send()
        .await
        .expect("token");
    let json: serde_json::Value = resp.json().await.expect("json");
    let both = json["token"].as_str().expect("token").to_owned();
    let resp = http.post(&mount).bearer_auth(&both).send().await.expect("POST");
    assert_eq!(resp.status(), 201, "mounted with a token for both scopes");
}

#[tokio::test]
async fn a_refused_push_says_who_may_not_do_what() {
    let s = start();
    let resp = client()
        .post(s.server.v2("readonly/tool/blobs/uploads/"))
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .expect("POST");
    let body = common::oci::assert_error(resp, 403, &["DENIED"]).await;
    let message = body["errors"][0]["message"].as_str().expect("message").to_owned();
    assert!(
        message.contains("user alice may not push on repository readonly/tool"),
        "{message}"
    );
    let token = String::from_utf8(
        run_cli(
            s.server.data_dir(),
            &[
                "token",
                "create",
                "--user",
                "alice",
                "--name",
                "ci",
                "--scope",
                "team/**:pull",
            ],
            "",
        )
        .stdout,
    )
    .expect("utf-8")
    .trim()
    .to_owned();
    let resp = client()
        .post(s.server.v2("team/app/blobs/uploads/"))
        .basic_auth("alice", Some(&token))
        .send()
        .await
        .expect("POST");
    let body = common::oci::assert_error(resp, 403, &["DENIED"]).await;
    let message = body["errors"][0]["message"].as_str().expect("message").to_owned();
    assert!(
        message.contains("the API token's scopes do not grant push on repository team/app"),
        "{message}"
    );
}
