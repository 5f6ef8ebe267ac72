//! Immutable tags over real HTTP (`[[immutable_tags]]`, the `overwrite` action): a tag a rule
//! covers cannot be moved or deleted, nor its manifest deleted by digest; re-pushing the same
//! manifest is allowed; identities with `overwrite` (an admin, a rule, an API token scoped for
//! it, a registry token granted `push` to such an identity) may; racing pushes to a new
//! immutable tag never both win; Spack's `buildcache push --force` of a rebuilt spec is refused
//! while its `index.spack` push is not. Runs on the backend `STOWAGE_TEST_BACKEND` names.

mod common;

use base64::Engine as _;
use common::oci::assert_error;
use common::spack::FixtureRepo;
use common::{TestServer, client, run_cli as stowage, sha256};
use reqwest::Response;
use serde_json::Value;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

const CONFIG: &str = r#"
[auth]
enabled = true
max_failed_logins = 1000

[[auth.rules]]
repositories = ["**"]
users = ["*"]
actions = ["pull", "push", "delete"]

[[auth.rules]]
repositories = ["prod/**"]
users = ["release"]
actions = ["overwrite"]

[[immutable_tags]]
repositories = ["prod/**"]
tags = ["v*"]

[[immutable_tags]]
repositories = ["spack/release"]
tags = ["*.spack"]
"#;

/// How a request authenticates.
#[derive(Clone)]
enum Creds {
    None,
    Basic(String, String),
    Bearer(String),
}

impl Creds {
    fn basic(user: &str, password: &str) -> Creds {
        Creds::Basic(user.into(), password.into())
    }

    fn apply(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Creds::None => rb,
            Creds::Basic(u, p) => rb.basic_auth(u, Some(p)),
            Creds::Bearer(t) => rb.bearer_auth(t),
        }
    }
}

/// A server with the rules above and users `dev` (pull, push, delete everywhere), `release`
/// (also overwrite on `prod/**`) and `admin`; passwords are `<name>-pw`.
struct Server {
    server: TestServer,
    _config: tempfile::TempDir,
}

impl Server {
    fn start(config: &str, auth: bool) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stowage.toml");
        std::fs::write(&path, config).expect("write config");
        let server = TestServer::start_with(&[
            ("STOWAGE_CONFIG", path.to_str().expect("utf-8 path")),
            ("STOWAGE_AUTH__ENABLED", if auth { "true" } else { "false" }),
        ]);
        if auth {
            for (name, admin) in [("dev", false), ("release", false), ("admin", true)] {
                let mut args = vec!["user", "add", name];
                if admin {
                    args.push("--admin");
                }
                stowage(server.data_dir(), &args, &format!("{name}-pw\n"));
            }
        }
        Server { server, _config: dir }
    }

    fn with_auth() -> Server {
        Self::start(CONFIG, true)
    }

    /// Creates an API token for `user` with `scope` and returns its secret.
    fn token_create(&self, user: &str, name: &str, scope: &str) -> String {
        let out = stowage(
            self.server.data_dir(),
            &["token", "create", "--user", user, "--name", name, "--scope", scope],
            "",
        );
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    async fn push_blob(&self, creds: &Creds, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let resp = creds
            .apply(
                client()
                    .post(self.server.v2(&format!("{repo}/blobs/uploads/?digest={digest}")))
                    .body(data.to_vec()),
            )
            .send()
            .await
            .expect("POST blob");
        assert_eq!(resp.status(), 201, "blob {digest} into {repo}");
        digest
    }

    /// Pushes the blobs of a one-layer image and returns its manifest (not yet pushed).
    async fn image(&self, creds: &Creds, repo: &str, layer: &str) -> Vec<u8> {
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = self.push_blob(creds, repo, config).await;
        let layer_digest = self.push_blob(creds, repo, layer.as_bytes()).await;
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
        }))
        .expect("manifest JSON")
    }

    async fn put(&self, creds: &Creds, repo: &str, reference: &str, body: &[u8]) -> Response {
        self.put_as(creds, repo, reference, body, OCI_MANIFEST).await
    }

    async fn put_as(&self, creds: &Creds, repo: &str, reference: &str, body: &[u8], content_type: &str) -> Response {
        creds
            .apply(
                client()
                    .put(self.server.v2(&format!("{repo}/manifests/{reference}")))
                    .header("Content-Type", content_type)
                    .body(body.to_vec()),
            )
            .send()
            .await
            .expect("PUT manifest")
    }

    async fn delete(&self, creds: &Creds, repo: &str, reference: &str) -> Response {
        creds
            .apply(client().delete(self.server.v2(&format!("{repo}/manifests/{reference}"))))
            .send()
            .await
            .expect("DELETE manifest")
    }

    /// The digest `repo:reference` resolves to, if it does.
    async fn resolve(&self, repo: &str, reference: &str) -> Option<String> {
        let resp = Creds::basic("admin", "admin-pw")
            .apply(
                client()
                    .head(self.server.v2(&format!("{repo}/manifests/{reference}")))
                    .header("Accept", OCI_MANIFEST),
            )
            .send()
            .await
            .expect("HEAD manifest");
        match resp.status().as_u16() {
            200 => Some(
                resp.headers()["docker-content-digest"]
                    .to_str()
                    .expect("digest header")
                    .to_owned(),
            ),
            404 => None,
            other => panic!("HEAD {repo}:{reference}: {other}"),
        }
    }

    /// A registry token from `/token` for `scope`, and the actions it grants on `repo`.
    async fn registry_token(&self, creds: &Creds, scope: &str, repo: &str) -> (String, Vec<String>) {
        let resp = creds
            .apply(
                client()
                    .get(format!("{}/token", self.server.url))
                    .query(&[("service", "stowage"), ("scope", scope)]),
            )
            .send()
            .await
            .expect("GET /token");
        assert_eq!(resp.status(), 200, "token for {scope}");
        let body: Value = resp.json().await.expect("token JSON");
        let token = body["token"].as_str().expect("token").to_owned();
        let payload = token.split('.').nth(1).expect("JWT payload");
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .expect("base64url payload"),
        )
        .expect("claims JSON");
        let actions = claims["access"]
            .as_array()
            .expect("access")
            .iter()
            .filter(|e| e["name"] == repo)
            .flat_map(|e| e["actions"].as_array().cloned().unwrap_or_default())
            .map(|a| a.as_str().expect("action").to_owned())
            .collect();
        (token, actions)
    }
}

/// Asserts a 403 `DENIED` whose message says the tag of the repository is immutable and names
/// the rule; returns the message.
async fn assert_immutable(resp: Response, repo: &str, tag: &str, rule: usize) -> String {
    let body = assert_error(resp, 403, &["DENIED"]).await;
    let message = body["errors"][0]["message"].as_str().expect("message").to_owned();
    assert!(
        message.starts_with(&format!(
            "tag {tag} in repository {repo} is immutable (immutable_tags rule {rule}:"
        )),
        "{message}"
    );
    assert!(message.contains("overwrite"), "says what would allow it: {message}");
    assert_eq!(body["errors"][0]["detail"]["tag"], tag, "{body}");
    assert_eq!(body["errors"][0]["detail"]["repository"], repo, "{body}");
    message
}

#[tokio::test]
async fn an_immutable_tag_refuses_a_changed_push_and_takes_the_same_manifest_again() {
    let s = Server::with_auth();
    let dev = Creds::basic("dev", "dev-pw");
    let a = s.image(&dev, "prod/app", "layer a").await;
    let b = s.image(&dev, "prod/app", "layer b").await;
    assert_eq!(
        s.put(&dev, "prod/app", "v1", &a).await.status(),
        201,
        "creating the tag"
    );
    // Re-pushing the manifest the tag names (docker push, spack buildcache push --force of an
    // unchanged spec) is allowed, as often as it comes.
    for _ in 0..2 {
        assert_eq!(s.put(&dev, "prod/app", "v1", &a).await.status(), 201, "same digest");
    }
    let message = assert_immutable(s.put(&dev, "prod/app", "v1", &b).await, "prod/app", "v1", 1).await;
    assert!(
        message.contains(&format!("cannot be moved to {}", sha256(&b))),
        "{message}"
    );
    assert!(message.contains("tags v* in repositories prod/**"), "{message}");
    assert_eq!(
        s.resolve("prod/app", "v1").await,
        Some(sha256(&a)),
        "the tag did not move"
    );
    // The refused manifest can still be pushed by digest, and under a tag no rule covers.
    assert_eq!(s.put(&dev, "prod/app", &sha256(&b), &b).await.status(), 201);
    assert_eq!(
        s.put(&dev, "prod/app", "v2", &b).await.status(),
        201,
        "a new immutable tag"
    );
}

#[tokio::test]
async fn tags_no_rule_covers_stay_mutable() {
    let s = Server::with_auth();
    let dev = Creds::basic("dev", "dev-pw");
    let a = s.image(&dev, "prod/app", "layer a").await;
    let b = s.image(&dev, "prod/app", "layer b").await;
    // Same repository, a tag outside `v*`.
    assert_eq!(s.put(&dev, "prod/app", "latest", &a).await.status(), 201);
    assert_eq!(s.put(&dev, "prod/app", "latest", &b).await.status(), 201);
    assert_eq!(s.resolve("prod/app", "latest").await, Some(sha256(&b)));
    assert_eq!(s.delete(&dev, "prod/app", "latest").await.status(), 202);
    // A `v*` tag in a repository no rule covers.
    let a = s.image(&dev, "dev/app", "layer a").await;
    let b = s.image(&dev, "dev/app", "layer b").await;
    assert_eq!(s.put(&dev, "dev/app", "v1", &a).await.status(), 201);
    assert_eq!(s.put(&dev, "dev/app", "v1", &b).await.status(), 201);
    assert_eq!(s.resolve("dev/app", "v1").await, Some(sha256(&b)));
    assert_eq!(s.delete(&dev, "dev/app", &sha256(&b)).await.status(), 202);
}

#[tokio::test]
async fn deleting_an_immutable_tag_or_the_manifest_it_names_is_refused() {
    let s = Server::with_auth();
    let dev = Creds::basic("dev", "dev-pw");
    let a = s.image(&dev, "prod/app", "layer a").await;
    let b = s.image(&dev, "prod/app", "layer b").await;
    assert_eq!(s.put(&dev, "prod/app", "v1", &a).await.status(), 201);
    assert_eq!(s.put(&dev, "prod/app", "latest", &a).await.status(), 201);
    let message = assert_immutable(s.delete(&dev, "prod/app", "v1").await, "prod/app", "v1", 1).await;
    assert!(message.contains("it cannot be deleted"), "{message}");
    // By digest it would take the tag with it: refused while the tag names it.
    let message = assert_immutable(s.delete(&dev, "prod/app", &sha256(&a)).await, "prod/app", "v1", 1).await;
    assert!(
        message.contains(&format!("manifest {}, which it names, cannot be deleted", sha256(&a))),
        "{message}"
    );
    assert_eq!(s.resolve("prod/app", "v1").await, Some(sha256(&a)));
    assert_eq!(
        s.resolve("prod/app", "latest").await,
        Some(sha256(&a)),
        "nothing was deleted"
    );
    // A mutable tag of the same manifest may still go; a manifest only mutable tags name too.
    assert_eq!(s.delete(&dev, "prod/app", "latest").await.status(), 202);
    assert_eq!(s.put(&dev, "prod/app", "latest", &b).await.status(), 201);
    assert_eq!(s.delete(&dev, "prod/app", &sha256(&b)).await.status(), 202);
    assert_eq!(s.resolve("prod/app", "latest").await, None);
    // Deleting what does not exist is still a plain 404.
    let resp = s.delete(&dev, "prod/app", "v9").await;
    assert_error(resp, 404, &["MANIFEST_UNKNOWN"]).await;
}

/// An OCI index listing `children`, each with its media type.
fn index_of(children: &[(&[u8], &str)]) -> Vec<u8> {
    let manifests: Vec<Value> = children
        .iter()
        .map(|(c, media_type)| serde_json::json!({"mediaType": media_type, "digest": sha256(c), "size": c.len()}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .expect("index JSON")
}

#[tokio::test]
async fn a_manifest_an_immutable_index_lists_cannot_be_deleted() {
    let s = Server::with_auth();
    let dev = Creds::basic("dev", "dev-pw");
    let repo = "prod/multi";
    let mut children = Vec::new();
    for layer in ["amd64", "arm64", "mutable"] {
        let m = s.image(&dev, repo, layer).await;
        assert_eq!(s.put(&dev, repo, &sha256(&m), &m).await.status(), 201);
        children.push(m);
    }
    // v1 names an index listing child 0; v2 names an index listing an untagged index listing
    // child 1.
    let direct = index_of(&[(&children[0], OCI_MANIFEST)]);
    assert_eq!(s.put_as(&dev, repo, "v1", &direct, OCI_INDEX).await.status(), 201);
    let inner = index_of(&[(&children[1], OCI_MANIFEST)]);
    assert_eq!(
        s.put_as(&dev, repo, &sha256(&inner), &inner, OCI_INDEX).await.status(),
        201
    );
    let outer = index_of(&[(&inner, OCI_INDEX)]);
    assert_eq!(s.put_as(&dev, repo, "v2", &outer, OCI_INDEX).await.status(), 201);
    for (child, tag, index) in [
        (&children[0], "v1", &direct),
        (&children[1], "v2", &outer),
        (&inner, "v2", &outer),
    ] {
        let message = assert_immutable(s.delete(&dev, repo, &sha256(child)).await, repo, tag, 1).await;
        let expected = format!(
            "manifest {}, which the index {} it names lists, cannot be deleted",
            sha256(child),
            sha256(index)
        );
        assert!(message.contains(&expected), "{message}");
        assert_eq!(s.resolve(repo, &sha256(child)).await, Some(sha256(child)));
    }
    // An index only a mutable tag names leaves its children deletable, as without rules.
    let mutable = index_of(&[(&children[2], OCI_MANIFEST)]);
    assert_eq!(s.put_as(&dev, repo, "latest", &mutable, OCI_INDEX).await.status(), 201);
    assert_eq!(s.delete(&dev, repo, &sha256(&children[2])).await.status(), 202);
    // With overwrite the child goes.
    let release = Creds::basic("release", "release-pw");
    assert_eq!(s.delete(&release, repo, &sha256(&children[0])).await.status(), 202);
    assert_eq!(s.resolve(repo, &sha256(&children[0])).await, None);
}

#[tokio::test]
async fn the_overwrite_action_moves_and_deletes_immutable_tags() {
    let s = Server::with_auth();
    let dev = Creds::basic("dev", "dev-pw");
    let a = s.image(&dev, "prod/app", "layer a").await;
    let b = s.image(&dev, "prod/app", "layer b").await;
    let c = s.image(&dev, "prod/app", "layer c").await;
    assert_eq!(s.put(&dev, "prod/app", "v1", &a).await.status(), 201);

    // An API token of the user with `overwrite`, scoped without it: refused (the token's scopes
    // narrow the user's rights); scoped with it: allowed.
    let narrow = Creds::basic(
        "release",
        &s.token_create("release", "narrow", "prod/**:pull,push,delete"),
    );
    assert_immutable(s.put(&narrow, "prod/app", "v1", &b).await, "prod/app", "v1", 1).await;
    let wide = Creds::basic(
        "release",
        &s.token_create("release", "wide", "prod/**:pull,push,delete,overwrite"),
    );
    assert_eq!(
        s.put(&wide, "prod/app", "v1", &b).await.status(),
        201,
        "token with overwrite"
    );
    assert_eq!(s.resolve("prod/app", "v1").await, Some(sha256(&b)));
    // A token scoped for `overwrite` whose user does not have it gets nothing from the scope.
    let dev_token = Creds::basic("dev", &s.token_create("dev", "all", "prod/**:*"));
    assert_immutable(s.put(&dev_token, "prod/app", "v1", &a).await, "prod/app", "v1", 1).await;

    // The user's own password (a rule grants `overwrite`) and an admin's.
    let release = Creds::basic("release", "release-pw");
    assert_eq!(
        s.put(&release, "prod/app", "v1", &c).await.status(),
        201,
        "rule with overwrite"
    );
    let admin = Creds::basic("admin", "admin-pw");
    assert_eq!(s.put(&admin, "prod/app", "v1", &a).await.status(), 201, "admin");
    assert_eq!(s.resolve("prod/app", "v1").await, Some(sha256(&a)));

    // The docker token flow: clients ask for `pull,push` only. The token of a user with
    // `overwrite` carries it, and overwrites; another user's does not, and is refused at once
    // with 403 (not a 401 challenge a client would retry with).
    let (token, actions) = s
        .registry_token(&release, "repository:prod/app:pull,push", "prod/app")
        .await;
    assert!(actions.iter().any(|a| a == "overwrite"), "{actions:?}");
    assert_eq!(
        s.put(&Creds::Bearer(token), "prod/app", "v1", &b).await.status(),
        201,
        "registry token of a user with overwrite"
    );
    let (token, actions) = s
        .registry_token(&dev, "repository:prod/app:pull,push", "prod/app")
        .await;
    assert_eq!(actions, ["pull", "push"]);
    assert_immutable(
        s.put(&Creds::Bearer(token), "prod/app", "v1", &c).await,
        "prod/app",
        "v1",
        1,
    )
    .await;
    // Asking for `overwrite` explicitly grants it only where the identity has it.
    let (_, actions) = s
        .registry_token(&dev, "repository:prod/app:pull,push,overwrite", "prod/app")
        .await;
    assert_eq!(actions, ["pull", "push"]);
    let (token, actions) = s
        .registry_token(&release, "repository:prod/app:pull,overwrite", "prod/app")
        .await;
    assert_eq!(actions, ["pull", "overwrite"]);

    // Deleting: by digest, then by tag, each with overwrite.
    assert_eq!(s.put(&dev, "prod/app", "v2", &c).await.status(), 201);
    assert_immutable(s.delete(&dev, "prod/app", "v2").await, "prod/app", "v2", 1).await;
    assert_eq!(s.delete(&release, "prod/app", &sha256(&c)).await.status(), 202);
    assert_eq!(s.resolve("prod/app", "v2").await, None);
    assert_eq!(s.delete(&wide, "prod/app", "v1").await.status(), 202);
    assert_eq!(s.resolve("prod/app", "v1").await, None);
    // A registry token with `overwrite` but no `delete` still may not delete: the route needs
    // `delete` first.
    assert_eq!(s.put(&dev, "prod/app", "v3", &a).await.status(), 201);
    let resp = s.delete(&Creds::Bearer(token), "prod/app", "v3").await;
    assert_eq!(resp.status(), 401, "insufficient scope for delete");
    // Without credentials nothing changes either.
    assert_eq!(s.put(&Creds::None, "prod/app", "v3", &b).await.status(), 401);
    assert_eq!(s.resolve("prod/app", "v3").await, Some(sha256(&a)));
}

#[tokio::test]
async fn racing_pushes_to_a_new_immutable_tag_never_both_win() {
    const ROUNDS: usize = 25;
    const PUSHERS: usize = 4;
    let s = Server::with_auth();
    let dev = Creds::basic("dev", "dev-pw");
    let mut images = Vec::new();
    for i in 0..PUSHERS {
        images.push(s.image(&dev, "prod/race", &format!("layer {i}")).await);
    }
    for round in 0..ROUNDS {
        let tag = format!("v{round}");
        let puts = images.iter().map(|m| s.put(&dev, "prod/race", &tag, m));
        let responses = futures_util::future::join_all(puts).await;
        let mut winners = Vec::new();
        for (i, resp) in responses.into_iter().enumerate() {
            match resp.status().as_u16() {
                201 => winners.push(i),
                403 => {
                    assert_immutable(resp, "prod/race", &tag, 1).await;
                }
                other => panic!("round {round}: pusher {i} got {other}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one push creates the tag: {winners:?}"
        );
        assert_eq!(
            s.resolve("prod/race", &tag).await,
            Some(sha256(&images[winners[0]])),
            "round {round}: the tag names the winner's manifest"
        );
    }
}

#[tokio::test]
async fn rules_hold_with_authentication_off() {
    let config = "[[immutable_tags]]\nrepositories = [\"**\"]\n";
    let s = Server::start(config, false);
    let open = Creds::None;
    let a = s.image(&open, "any/app", "layer a").await;
    let b = s.image(&open, "any/app", "layer b").await;
    assert_eq!(s.put(&open, "any/app", "latest", &a).await.status(), 201);
    assert_eq!(s.put(&open, "any/app", "latest", &a).await.status(), 201);
    let message = assert_immutable(s.put(&open, "any/app", "latest", &b).await, "any/app", "latest", 1).await;
    assert!(message.contains("tags * in repositories **"), "{message}");
    assert_immutable(s.delete(&open, "any/app", "latest").await, "any/app", "latest", 1).await;
}

/// Spack's wire protocol: `spack buildcache push --force` of a spec whose tag exists pushes the
/// rebuilt tarball and config as blobs and PUTs a new manifest under the same spec tag; then
/// `update-index` PUTs `index.spack`. With the spec tags immutable the first is refused with
/// the message Spack prints, an unchanged re-push passes, and the index push is never refused.
#[tokio::test]
async fn spack_force_push_of_a_rebuilt_spec_is_refused() {
    let s = Server::with_auth();
    let ci = Creds::basic("dev", "dev-pw");
    let repo = "spack/release";
    let fixture = FixtureRepo::load("http-noauth", "spack_buildcache");
    for (digest, data) in &fixture.blobs {
        assert_eq!(s.push_blob(&ci, repo, data).await, *digest);
    }
    let tag = fixture.spec_tags().into_iter().next().expect("a spec tag");
    let (original, content_type) = fixture.manifests[&tag].clone();
    assert_eq!(content_type, OCI_MANIFEST);
    assert_eq!(s.put(&ci, repo, &tag, &original).await.status(), 201);
    // An unchanged re-push (what `--force` sends when the build is reproducible).
    assert_eq!(s.put(&ci, repo, &tag, &original).await.status(), 201);

    // A rebuild: a new tarball, the config's checksum of it, a manifest naming both.
    let mut manifest: Value = serde_json::from_slice(&original).expect("spec manifest");
    let old_layer = manifest["layers"][0]["digest"].as_str().expect("layer").to_owned();
    let mut tarball = fixture.blobs[&old_layer].clone();
    tarball.extend_from_slice(b"rebuilt");
    let new_layer = s.push_blob(&ci, repo, &tarball).await;
    let old_config = manifest["config"]["digest"].as_str().expect("config").to_owned();
    let mut config: Value = serde_json::from_slice(&fixture.blobs[&old_config]).expect("spec config");
    config["binary_cache_checksum"]["hash"] = Value::String(new_layer.trim_start_matches("sha256:").to_owned());
    let config = serde_json::to_vec(&config).expect("config JSON");
    let new_config = s.push_blob(&ci, repo, &config).await;
    manifest["layers"][0]["digest"] = Value::String(new_layer);
    manifest["layers"][0]["size"] = tarball.len().into();
    manifest["config"]["digest"] = Value::String(new_config);
    manifest["config"]["size"] = config.len().into();
    let rebuilt = serde_json::to_vec(&manifest).expect("manifest JSON");
    assert_immutable(s.put(&ci, repo, &tag, &rebuilt).await, repo, &tag, 2).await;
    assert_eq!(s.resolve(repo, &tag).await, Some(sha256(&original)));

    // `update-index` pushes of `index.spack` are never refused, changed or not.
    let (index_manifest, _) = fixture.manifests["index.spack"].clone();
    assert_eq!(s.put(&ci, repo, "index.spack", &index_manifest).await.status(), 201);
    let mut changed: Value = serde_json::from_slice(&index_manifest).expect("index manifest");
    changed["annotations"] = serde_json::json!({"org.example.rebuilt": "yes"});
    let changed = serde_json::to_vec(&changed).expect("index manifest JSON");
    assert_eq!(s.put(&ci, repo, "index.spack", &changed).await.status(), 201);
    // The index the server serves still lists the spec.
    let hash = tag
        .trim_end_matches(".spack")
        .rsplit('-')
        .next()
        .expect("spec hash")
        .to_owned();
    let resp = ci
        .apply(client().get(s.server.v2(&format!("{repo}/manifests/index.spack"))))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("GET index.spack");
    assert_eq!(resp.status(), 200);
    let index_manifest: Value = resp.json().await.expect("index manifest");
    let digest = index_manifest["layers"][0]["digest"].as_str().expect("index layer");
    let index: Value = ci
        .apply(client().get(s.server.v2(&format!("{repo}/blobs/{digest}"))))
        .send()
        .await
        .expect("GET index blob")
        .json()
        .await
        .expect("index JSON");
    assert_eq!(
        index["database"]["installs"][&hash]["in_buildcache"], true,
        "{hash} in the index"
    );
}
