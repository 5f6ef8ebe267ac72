//! The audit trail over real HTTP, with authentication on, on the configured blob backend:
//! pushes (with a password and with an API token), tag, manifest and blob deletes, token
//! creation and revocation each leave a row naming the actor, the token, the client address
//! and the request id; refusals (a denied push, a refused immutable tag, a failed login) are
//! recorded too; only admins may read `GET /stowage/v1/audit`, whose pages follow `Link` and
//! hold every row once; `stowage audit` prints the same rows; old rows are pruned at start-up.

mod common;

use common::{TestServer, client, run_cli as stowage, sha256, wait_until};
use reqwest::StatusCode;
use serde_json::Value;

const CONFIG: &str = r#"
[auth]
enabled = true
max_failed_logins = 1000

[[auth.rules]]
repositories = ["**"]
users = ["*"]
actions = ["pull"]

[[auth.rules]]
repositories = ["**"]
users = ["pusher"]
actions = ["pull", "push"]

[[immutable_tags]]
repositories = ["locked/**"]
tags = ["v*"]

[audit]
retention_days = 30
"#;

/// Credentials a request carries.
#[derive(Clone)]
enum Creds {
    None,
    Basic(String, String),
}

impl Creds {
    fn basic(user: &str, password: &str) -> Creds {
        Creds::Basic(user.to_owned(), password.to_owned())
    }

    fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Creds::None => req,
            Creds::Basic(u, p) => req.basic_auth(u, Some(p)),
        }
    }
}

/// A server with authentication on and users `reader`, `pusher`, `admin` (password
/// `<name>-pw`).
struct AuditServer {
    server: TestServer,
    _config: tempfile::TempDir,
}

impl AuditServer {
    fn start() -> AuditServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stowage.toml");
        std::fs::write(&path, CONFIG).expect("write config");
        let server = TestServer::start_with(&[
            ("STOWAGE_CONFIG", path.to_str().expect("utf-8 path")),
            ("STOWAGE_AUTH__ENABLED", "true"),
        ]);
        for (name, admin) in [("reader", false), ("pusher", false), ("admin", true)] {
            let mut args = vec!["user", "add", name];
            if admin {
                args.push("--admin");
            }
            stowage(server.data_dir(), &args, &format!("{name}-pw\n"));
        }
        AuditServer { server, _config: dir }
    }

    /// Creates an API token; returns its secret.
    fn token(&self, user: &str, name: &str, scope: &str) -> String {
        let out = stowage(
            self.server.data_dir(),
            &["token", "create", "--user", user, "--name", name, "--scope", scope],
            "",
        );
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// Uploads the image's blobs as `who`, then PUTs its manifest under `tag` with request id
    /// `request_id`; returns the status, the manifest's digest and the layer's digest.
    async fn push(&self, who: &Creds, repo: &str, tag: &str, layer: &str, request_id: &str) -> (u16, String, String) {
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let layer = layer.as_bytes();
        for blob in [&config[..], layer] {
            let url = self
                .server
                .v2(&format!("{repo}/blobs/uploads/?digest={}", sha256(blob)));
            let resp = who
                .apply(client().post(url).body(blob.to_vec()))
                .send()
                .await
                .expect("POST blob");
            if resp.status() != 201 {
                return (resp.status().as_u16(), String::new(), String::new());
            }
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(layer), "size": layer.len()}],
        })
        .to_string();
        let resp = who
            .apply(
                client()
                    .put(self.server.v2(&format!("{repo}/manifests/{tag}")))
                    .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                    .header("X-Request-Id", request_id)
                    .body(manifest.clone()),
            )
            .send()
            .await
            .expect("PUT manifest");
        (resp.status().as_u16(), sha256(manifest.as_bytes()), sha256(layer))
    }

    async fn delete(&self, who: &Creds, path: &str, request_id: &str) -> u16 {
        who.apply(client().delete(self.server.v2(path)).header("X-Request-Id", request_id))
            .send()
            .await
            .expect("DELETE")
            .status()
            .as_u16()
    }

    /// `GET /stowage/v1/audit?<query>`: status, body, `Link` header.
    async fn audit(&self, who: &Creds, query: &str) -> (StatusCode, Value, Option<String>) {
        let url = format!("{}/stowage/v1/audit?{query}", self.server.url);
        let resp = who.apply(client().get(url)).send().await.expect("GET audit");
        let status = resp.status();
        let link = resp
            .headers()
            .get("link")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body, link)
    }

    /// Every row, following `Link` from a first page of `limit` rows.
    async fn all_rows(&self, limit: usize) -> Vec<Value> {
        let admin = Creds::basic("admin", "admin-pw");
        let mut rows = Vec::new();
        let mut url = format!("/stowage/v1/audit?limit={limit}");
        loop {
            let resp = admin
                .apply(client().get(format!("{}{url}", self.server.url)))
                .send()
                .await
                .expect("GET audit page");
            assert_eq!(resp.status(), 200);
            let link = resp
                .headers()
                .get("link")
                .map(|v| v.to_str().expect("ascii").to_owned());
            let body: Value = resp.json().await.expect("json");
            let entries = body["entries"].as_array().expect("entries").clone();
            assert!(entries.len() <= limit, "a page holds at most its limit");
            rows.extend(entries);
            match link {
                Some(link) => {
                    assert!(link.ends_with("; rel=\"next\""), "{link}");
                    url = link
                        .trim_start_matches('<')
                        .split('>')
                        .next()
                        .expect("link target")
                        .to_owned();
                    let cursor = body["next_cursor"].as_i64().expect("next_cursor beside a Link");
                    assert!(url.contains(&format!("cursor={cursor}")), "{url}");
                }
                None => {
                    assert!(body["next_cursor"].is_null());
                    return rows;
                }
            }
        }
    }

    /// Runs `stowage audit` with `args`.
    fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["audit"];
        all.extend_from_slice(args);
        let out = self.server.stowage_command(&all).output().expect("run stowage audit");
        assert!(
            out.status.success(),
            "stowage audit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }
}

/// The single row of `action` whose `field` is `value`.
fn row<'a>(rows: &'a [Value], action: &str, field: &str, value: &str) -> &'a Value {
    let found: Vec<&Value> = rows
        .iter()
        .filter(|r| r["action"] == action && r[field] == value)
        .collect();
    assert_eq!(found.len(), 1, "one {action} row with {field} = {value}: {rows:#?}");
    found[0]
}

#[tokio::test]
async fn changes_are_recorded_with_actor_token_and_address() {
    let s = AuditServer::start();
    let pusher = Creds::basic("pusher", "pusher-pw");
    let admin = Creds::basic("admin", "admin-pw");
    let ci_secret = s.token("pusher", "ci", "app:pull,push");
    let ops_secret = s.token("admin", "ops", "**:*");
    let ci = Creds::basic("pusher", &ci_secret);
    let ops = Creds::basic("admin", &ops_secret);

    let (status, v1, layer1) = s.push(&pusher, "app", "v1", "layer one", "push-v1").await;
    assert_eq!(status, 201);
    let (status, v2, _) = s.push(&ci, "app", "v2", "layer two", "push-v2").await;
    assert_eq!(status, 201);
    // Moving a tag: the row says where it pointed before.
    let (status, moved, _) = s.push(&ci, "app", "v1", "layer three", "move-v1").await;
    assert_eq!(status, 201);
    assert_eq!(s.delete(&admin, "app/manifests/v1", "del-tag").await, 202);
    assert_eq!(
        s.delete(&ops, &format!("app/manifests/{v2}"), "del-manifest").await,
        202
    );
    assert_eq!(s.delete(&admin, &format!("app/blobs/{layer1}"), "del-blob").await, 202);
    stowage(s.server.data_dir(), &["token", "revoke", "ci"], "");

    let rows = s.all_rows(1000).await;
    let push1 = row(&rows, "manifest.push", "request_id", "push-v1");
    assert_eq!(push1["actor"], "pusher");
    assert_eq!(push1["token_id"], Value::Null, "signed in with the password");
    assert_eq!(push1["client"], "127.0.0.1");
    assert_eq!(
        (&push1["repository"], &push1["tag"], &push1["digest"]),
        (&"app".into(), &"v1".into(), &v1.clone().into())
    );
    assert_eq!(push1["detail"], Value::Null, "a new tag moved nothing");

    let push2 = row(&rows, "manifest.push", "request_id", "push-v2");
    assert_eq!(push2["actor"], "pusher");
    assert_eq!(push2["token_name"], "ci", "pushed with the API token");
    assert!(push2["token_id"].is_i64());
    assert_eq!(push2["digest"], v2.as_str());

    let moved_row = row(&rows, "manifest.push", "request_id", "move-v1");
    assert_eq!(moved_row["digest"], moved.as_str());
    assert_eq!(
        moved_row["detail"]["previous"],
        v1.as_str(),
        "the tag's previous manifest"
    );

    let tag = row(&rows, "tag.delete", "request_id", "del-tag");
    assert_eq!(
        (&tag["actor"], &tag["tag"], &tag["digest"]),
        (&"admin".into(), &"v1".into(), &moved.clone().into())
    );
    assert_eq!(tag["token_name"], Value::Null);

    let manifest = row(&rows, "manifest.delete", "request_id", "del-manifest");
    assert_eq!(manifest["actor"], "admin");
    assert_eq!(manifest["token_name"], "ops");
    assert_eq!(manifest["digest"], v2.as_str());
    assert_eq!(manifest["detail"]["tags"], serde_json::json!(["v2"]));
    assert_eq!(manifest["client"], "127.0.0.1");

    let blob = row(&rows, "blob.delete", "request_id", "del-blob");
    assert_eq!(
        (&blob["actor"], &blob["digest"]),
        (&"admin".into(), &layer1.clone().into())
    );

    let revoke = rows
        .iter()
        .find(|r| r["action"] == "token.revoke")
        .expect("a token.revoke row");
    assert_eq!(revoke["actor"], "cli");
    assert_eq!(revoke["detail"]["token_name"], "ci");
    assert_eq!(revoke["detail"]["user"], "pusher");
    assert_eq!(
        revoke["detail"]["token_id"], push2["token_id"],
        "the token the push used"
    );
    assert!(
        revoke["client"].as_str().is_some_and(|c| c.starts_with("local:")),
        "{revoke}"
    );
    let creates: Vec<&Value> = rows.iter().filter(|r| r["action"] == "token.create").collect();
    assert_eq!(creates.len(), 2);
    assert_eq!(rows.iter().filter(|r| r["action"] == "user.add").count(), 3);
    // Never a secret: no row mentions a token secret or a password.
    let all = serde_json::to_string(&rows).expect("json");
    for secret in [ci_secret.as_str(), ops_secret.as_str(), "pusher-pw", "admin-pw", "stw_"] {
        assert!(!all.contains(secret), "a row holds {secret}");
    }

    // The CLI prints the same rows, as JSON lines and as text.
    let printed: Vec<Value> = s
        .cli(&["--json", "--limit", "1000"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(printed, rows);
    let text = s.cli(&["--repo", "app", "--user", "admin"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("blob.delete") && lines[0].contains(&layer1), "{text}");
    assert!(
        lines[1].contains("manifest.delete") && lines[1].contains("ops ("),
        "{text}"
    );
    assert!(
        lines[2].contains("tag.delete") && lines[2].contains("app:v1@"),
        "{text}"
    );
    // And the endpoint filters the same way.
    let (status, body, _) = s.audit(&admin, "repo=app&user=admin").await;
    assert_eq!(status, 200);
    assert_eq!(body["entries"].as_array().expect("entries").len(), 3);
}

#[tokio::test]
async fn only_admins_may_read_the_trail_and_nobody_may_write_it() {
    let s = AuditServer::start();
    let admin = Creds::basic("admin", "admin-pw");
    let ops = Creds::basic("admin", &s.token("admin", "ops", "**:*"));
    for who in [
        Creds::basic("reader", "reader-pw"),
        Creds::basic("pusher", "pusher-pw"),
        ops,
    ] {
        let (status, body, _) = s.audit(&who, "").await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["errors"][0]["code"], "DENIED", "{body}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("audit trail"))
        );
    }
    let (status, _, _) = s.audit(&Creds::None, "").await;
    assert_eq!(status, 401, "anonymous clients are challenged");
    let (status, body, _) = s.audit(&admin, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["entries"].as_array().is_some_and(|e| !e.is_empty()));
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::PATCH,
    ] {
        let resp = admin
            .apply(client().request(method.clone(), format!("{}/stowage/v1/audit", s.server.url)))
            .body("{}")
            .send()
            .await
            .expect("write attempt");
        assert_eq!(resp.status(), 405, "{method}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["errors"][0]["code"], "UNSUPPORTED");
    }
    for bad in ["limit=0", "limit=1001", "limit=x", "cursor=abc", "since=yesterday"] {
        let (status, body, _) = s.audit(&admin, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["errors"][0]["code"].is_string(), "{bad}: {body}");
    }
}

#[tokio::test]
async fn pages_hold_every_row_once_newest_first() {
    let s = AuditServer::start();
    let pusher = Creds::basic("pusher", "pusher-pw");
    for i in 0..12 {
        let (status, _, _) = s
            .push(&pusher, "paged", &format!("t{i}"), "one layer", &format!("p{i}"))
            .await;
        assert_eq!(status, 201);
    }
    let everything = s.all_rows(1000).await;
    assert!(everything.len() >= 15, "12 pushes and 3 users: {}", everything.len());
    let ids: Vec<i64> = everything.iter().map(|r| r["id"].as_i64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    for limit in [1, 4, 5, 1000] {
        let paged = s.all_rows(limit).await;
        assert_eq!(paged, everything, "pages of {limit}");
    }
    // Filters: since a point in the future finds nothing; since an hour ago finds all.
    let admin = Creds::basic("admin", "admin-pw");
    let (_, body, _) = s.audit(&admin, "since=2999-01-01T00:00:00Z").await;
    assert_eq!(body["entries"], serde_json::json!([]));
    let (_, body, _) = s.audit(&admin, "since=1h&limit=1000").await;
    assert_eq!(body["entries"].as_array().expect("entries").len(), everything.len());
    let (_, body, _) = s.audit(&admin, "repo=paged&limit=1000").await;
    assert_eq!(body["entries"].as_array().expect("entries").len(), 12);
}

#[tokio::test]
async fn refusals_are_recorded() {
    let s = AuditServer::start();
    let reader = Creds::basic("reader", "reader-pw");
    let pusher = Creds::basic("pusher", "pusher-pw");
    // A push the policy refuses.
    let (status, _, _) = s.push(&reader, "app", "v1", "layer", "denied").await;
    assert_eq!(status, 403);
    // An immutable tag that may not move.
    let (status, _, _) = s.push(&pusher, "locked/app", "v1", "first", "locked-1").await;
    assert_eq!(status, 201);
    let (status, _, _) = s.push(&pusher, "locked/app", "v1", "second", "locked-2").await;
    assert_eq!(status, 403);
    // A failed login.
    let resp = client()
        .get(s.server.v2("app/tags/list"))
        .basic_auth("pusher", Some("wrong-pw"))
        .header("X-Request-Id", "bad-login")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);

    // Refusals are written in batches, off the request's path.
    let recorded = |rows: &[Value]| {
        ["denied.push", "denied.immutable", "login.failed"]
            .iter()
            .all(|a| rows.iter().any(|r| r["action"] == *a))
    };
    wait_until("the refusals are in the audit trail", || async {
        recorded(&s.all_rows(1000).await)
    })
    .await;
    let rows = s.all_rows(1000).await;
    let denied = row(&rows, "denied.push", "actor", "reader");
    assert_eq!(denied["repository"], "app");
    assert_eq!(denied["client"], "127.0.0.1");
    let immutable = row(&rows, "denied.immutable", "actor", "pusher");
    assert_eq!(
        (&immutable["repository"], &immutable["tag"]),
        (&"locked/app".into(), &"v1".into())
    );
    assert_eq!(immutable["request_id"], "locked-2");
    let login = row(&rows, "login.failed", "request_id", "bad-login");
    assert_eq!(login["actor"], "pusher");
    assert!(!serde_json::to_string(&rows).expect("json").contains("wrong-pw"));
    // The refused changes left nothing else: one push of locked/app, none of app.
    assert_eq!(
        rows.iter().filter(|r| r["action"] == "manifest.push").count(),
        1,
        "{rows:#?}"
    );
}

#[tokio::test]
async fn rows_past_the_retention_are_pruned_at_start() {
    let mut s = AuditServer::start();
    let pusher = Creds::basic("pusher", "pusher-pw");
    let (status, _, _) = s.push(&pusher, "app", "v1", "layer", "kept-push").await;
    assert_eq!(status, 201);
    assert!(s.server.terminate().success());

    // Rows planted while the server is stopped: two older than the 30 days kept, one younger.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    {
        let db = s.server.catalog_sql();
        for (age_days, request) in [(400, "ancient"), (31, "old"), (10, "recent")] {
            db.execute(
                "INSERT INTO audit_log (at, action, repository, actor, request_id) VALUES (?1, 'tag.delete', 'app', 'planted', ?2)",
                &[(now - age_days * 86_400).into(), request.into()],
            );
        }
    }
    s.server.crash_and_restart();
    let pruned = |rows: &[Value]| {
        !rows
            .iter()
            .any(|r| r["request_id"] == "ancient" || r["request_id"] == "old")
    };
    wait_until("the rows past the retention are deleted", || async {
        pruned(&s.all_rows(1000).await)
    })
    .await;
    let rows = s.all_rows(1000).await;
    row(&rows, "tag.delete", "request_id", "recent");
    row(&rows, "manifest.push", "request_id", "kept-push");
    assert_eq!(rows.iter().filter(|r| r["action"] == "user.add").count(), 3);
}
