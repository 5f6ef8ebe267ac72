//! Authentication and access control over real HTTP: the token flow as clients speak it, the
//! access matrix (every identity × operation × public/private repository), forged and expired
//! tokens, insufficient scope, Basic straight to /v2/, revocation at once, uploads outliving
//! their token, and failed-login rate limiting.

mod common;

use std::process::{Command, Stdio};

use base64::Engine as _;
use common::{TestServer, client, run_cli as stowage, sha256};
use reqwest::{Method, StatusCode};

const CONFIG: &str = r#"
[auth]
enabled = true
anonymous_pull = ["public/**"]
max_failed_logins = 1000

[[auth.rules]]
repositories = ["**"]
users = ["*"]
actions = ["pull"]

[[auth.rules]]
repositories = ["**"]
users = ["pusher"]
actions = ["pull", "push"]
"#;

/// A server with authentication on, users `reader`, `pusher`, `admin` (password `<name>-pw`),
/// and the images `public/app:v1` and `private/app:v1`.
struct AuthServer {
    server: TestServer,
    _config: tempfile::TempDir,
}

impl AuthServer {
    async fn start() -> AuthServer {
        Self::start_with(CONFIG).await
    }

    async fn start_with(config: &str) -> AuthServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stowage.toml");
        std::fs::write(&path, config).expect("write config");
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
        let s = AuthServer { server, _config: dir };
        for repo in ["public/app", "private/app"] {
            s.push_image(repo, "v1").await;
        }
        s
    }

    fn token_create(&self, user: &str, name: &str, scope: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--user", user, "--name", name, "--scope", scope];
        args.extend_from_slice(extra);
        let out = stowage(self.server.data_dir(), &args, "");
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// Pushes a small image with admin's Basic credentials.
    async fn push_image(&self, repo: &str, tag: &str) {
        let admin = Creds::basic("admin", "admin-pw");
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let layer = format!("layer of {repo}").into_bytes();
        for blob in [&config[..], &layer[..]] {
            let url = self
                .server
                .v2(&format!("{repo}/blobs/uploads/?digest={}", sha256(blob)));
            let resp = admin
                .apply(client().post(url).body(blob.to_vec()))
                .send()
                .await
                .expect("POST");
            assert_eq!(resp.status(), 201);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer), "size": layer.len()}],
        });
        let resp = admin
            .apply(
                client()
                    .put(self.server.v2(&format!("{repo}/manifests/{tag}")))
                    .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                    .body(manifest.to_string()),
            )
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(resp.status(), 201);
    }

    /// A registry token signed with the server's own key, with the claims given.
    fn craft_token(
        &self,
        sub: &str,
        access: Vec<stowage::auth::jwt::AccessEntry>,
        exp_offset: i64,
        nbf_offset: i64,
    ) -> String {
        let keys = stowage::auth::KeySet::load(&stowage::auth::keys::key_dir(self.server.data_dir()), None, &[], 0)
            .expect("load the server's keys");
        let now = jsonwebtoken::get_current_timestamp() as i64;
        // The user's credentials epoch, as the server would put it in a token signed in with
        // the password.
        let epoch: i64 = self
            .server
            .catalog_sql()
            .query_rows("SELECT credentials_epoch FROM users WHERE name = ?1", &[sub.into()])
            .first()
            .map_or(0, |row| row[0].int());
        let claims = stowage::auth::Claims {
            iss: "stowage".into(),
            sub: sub.into(),
            aud: "stowage".into(),
            exp: (now + exp_offset) as u64,
            nbf: (now + nbf_offset) as u64,
            iat: now as u64,
            jti: "test".into(),
            access,
            tid: None,
            token_use: stowage::auth::TokenUse::Access,
            epoch,
        };
        stowage::auth::jwt::sign(&keys, &claims).expect("sign")
    }
}

/// What a client presents.
#[derive(Clone)]
enum Creds {
    None,
    Basic(String, String),
    /// A fixed token, used as is (no token flow).
    Bearer(String),
}

impl Creds {
    fn basic(u: &str, p: &str) -> Creds {
        Creds::Basic(u.into(), p.into())
    }

    fn apply(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Creds::None => rb,
            Creds::Basic(u, p) => rb.basic_auth(u, Some(p)),
            Creds::Bearer(t) => rb.bearer_auth(t),
        }
    }
}

/// The parameters of the Bearer challenge of a 401.
fn bearer_challenge(resp: &reqwest::Response) -> Option<Vec<(String, String)>> {
    let value = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("Bearer "))?
        .to_owned();
    let mut params = Vec::new();
    let mut rest = value.trim_start_matches("Bearer ").trim();
    while let Some((k, after)) = rest.split_once("=\"") {
        let (v, after) = after.split_once('"')?;
        params.push((k.trim_start_matches(',').trim().to_owned(), v.to_owned()));
        rest = after;
    }
    Some(params)
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Does what docker does: try anonymously (or with a fixed token); on a Bearer challenge fetch a
/// token for the challenge's scope from its realm, with Basic credentials if any, and retry
/// once. Returns the final response.
async fn flow(creds: &Creds, method: Method, url: &str) -> reqwest::Response {
    let first_creds = match creds {
        Creds::Bearer(_) => creds.clone(),
        _ => Creds::None,
    };
    let resp = first_creds
        .apply(client().request(method.clone(), url))
        .send()
        .await
        .expect("request");
    if resp.status() != StatusCode::UNAUTHORIZED || matches!(creds, Creds::Bearer(_)) {
        return resp;
    }
    let challenge = bearer_challenge(&resp).expect("a 401 carries a Bearer challenge");
    let realm = param(&challenge, "realm").expect("realm").to_owned();
    let mut query = vec![("service", param(&challenge, "service").expect("service").to_owned())];
    if let Some(scope) = param(&challenge, "scope") {
        query.push(("scope", scope.to_owned()));
    }
    let token_resp = creds
        .apply(client().get(&realm).query(&query))
        .send()
        .await
        .expect("token request");
    if token_resp.status() != StatusCode::OK {
        return token_resp;
    }
    let body: serde_json::Value = token_resp.json().await.expect("token json");
    let token = body["token"].as_str().expect("token").to_owned();
    assert_eq!(body["access_token"].as_str(), Some(token.as_str()));
    client()
        .request(method, url)
        .bearer_auth(token)
        .send()
        .await
        .expect("retry")
}

/// Presents credentials up front: Basic identities either fetch a registry token for `scope`
/// first (`via_token`), or send Basic straight to /v2/. Returns the final response (the token
/// endpoint's, if that refused).
async fn present(creds: &Creds, via_token: bool, method: Method, url: &str, scope: &str) -> reqwest::Response {
    let creds = match creds {
        Creds::Basic(..) if via_token => {
            let resp = creds
                .apply(
                    client()
                        .get(token_url(url))
                        .query(&[("service", "stowage"), ("scope", scope)]),
                )
                .send()
                .await
                .expect("token request");
            if resp.status() != StatusCode::OK {
                return resp;
            }
            let body: serde_json::Value = resp.json().await.expect("token json");
            Creds::Bearer(body["token"].as_str().expect("token").to_owned())
        }
        other => other.clone(),
    };
    creds
        .apply(client().request(method, url))
        .send()
        .await
        .expect("request")
}

/// `<scheme>://<host>/token` for a URL of the same server.
fn token_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("absolute url");
    let host = rest.split('/').next().unwrap_or_default();
    format!("{scheme}://{host}/token")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// 2xx (or 404 for a delete of something absent: allowed, nothing there).
    Ok,
    /// 401 UNAUTHORIZED.
    Unauth,
    /// 403 DENIED.
    Denied,
}

async fn classify(resp: reqwest::Response) -> (Want, String) {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let want = match status.as_u16() {
        401 => {
            assert!(text.contains("UNAUTHORIZED"), "401 body: {text}");
            Want::Unauth
        }
        403 => {
            assert!(text.contains("DENIED"), "403 body: {text}");
            Want::Denied
        }
        200..=299 | 404 => Want::Ok,
        other => panic!("unexpected status {other}: {text}"),
    };
    (want, format!("{status} {text}"))
}

#[tokio::test]
async fn access_matrix() {
    let s = AuthServer::start().await;
    let revoked = s.token_create("pusher", "revoked", "**:pull,push", &[]);
    stowage(
        s.server.data_dir(),
        &["token", "revoke", "revoked", "--user", "pusher"],
        "",
    );
    let other = s.token_create("pusher", "other", "other/**:pull,push", &[]);
    let expired = s.craft_token(
        "admin",
        vec![
            stowage::auth::jwt::AccessEntry::repository("public/app", &stowage::auth::Action::ALL),
            stowage::auth::jwt::AccessEntry::repository("private/app", &stowage::auth::Action::ALL),
        ],
        -120,
        -600,
    );
    let identities: Vec<(&str, Creds)> = vec![
        ("anonymous", Creds::None),
        ("reader", Creds::basic("reader", "reader-pw")),
        ("pusher", Creds::basic("pusher", "pusher-pw")),
        ("admin", Creds::basic("admin", "admin-pw")),
        ("expired", Creds::Bearer(expired)),
        ("revoked", Creds::basic("pusher", &revoked)),
        ("other-scoped", Creds::basic("pusher", &other)),
    ];
    let subject = {
        let resp = client()
            .head(s.server.v2("public/app/manifests/v1"))
            .send()
            .await
            .expect("HEAD");
        resp.headers()["docker-content-digest"]
            .to_str()
            .expect("digest")
            .to_owned()
    };
    use Want::*;
    // (operation, method, path) → expected for each identity in the order above, per repository.
    // A token scoped elsewhere gets what anonymous clients get: pull on the public repository.
    type Row = (&'static str, Method, &'static str, [Want; 7], [Want; 7]);
    let rows: Vec<Row> = vec![
        // op            method           path                                public                                       private
        (
            "pull",
            Method::GET,
            "manifests/v1",
            [Ok, Ok, Ok, Ok, Unauth, Unauth, Ok],
            [Unauth, Ok, Ok, Ok, Unauth, Unauth, Denied],
        ),
        (
            "push",
            Method::POST,
            "blobs/uploads/",
            [Unauth, Denied, Ok, Ok, Unauth, Unauth, Denied],
            [Unauth, Denied, Ok, Ok, Unauth, Unauth, Denied],
        ),
        (
            "delete",
            Method::DELETE,
            "manifests/absent",
            [Unauth, Denied, Denied, Ok, Unauth, Unauth, Denied],
            [Unauth, Denied, Denied, Ok, Unauth, Unauth, Denied],
        ),
        (
            "tags",
            Method::GET,
            "tags/list",
            [Ok, Ok, Ok, Ok, Unauth, Unauth, Ok],
            [Unauth, Ok, Ok, Ok, Unauth, Unauth, Denied],
        ),
        (
            "referrers",
            Method::GET,
            "referrers/{subject}",
            [Ok, Ok, Ok, Ok, Unauth, Unauth, Ok],
            [Unauth, Ok, Ok, Ok, Unauth, Unauth, Denied],
        ),
    ];
    let mut failures = Vec::new();
    let mut cells = 0;
    for via_token in [true, false] {
        let how = if via_token { "token" } else { "basic" };
        for (op, method, path, public, private) in &rows {
            for (repo, expected) in [("public/app", public), ("private/app", private)] {
                let url = s.server.v2(&format!("{repo}/{}", path.replace("{subject}", &subject)));
                let scope = match *op {
                    "push" => format!("repository:{repo}:pull,push"),
                    "delete" => format!("repository:{repo}:delete"),
                    _ => format!("repository:{repo}:pull"),
                };
                for ((who, creds), want) in identities.iter().zip(expected.iter()) {
                    let resp = present(creds, via_token, method.clone(), &url, &scope).await;
                    let (got, detail) = classify(resp).await;
                    cells += 1;
                    if got != *want {
                        failures.push(format!("[{how}] {who} {op} {repo}: want {want:?}, got {detail}"));
                    }
                }
            }
        }
    }
    // And the reactive flow docker uses (anonymous first, a token on the 401) agrees wherever
    // the anonymous attempt is refused.
    for (op, method, path, _, private) in &rows {
        let url = s
            .server
            .v2(&format!("private/app/{}", path.replace("{subject}", &subject)));
        for ((who, creds), want) in identities.iter().zip(private.iter()) {
            let (got, detail) = classify(flow(creds, method.clone(), &url).await).await;
            cells += 1;
            if got != *want {
                failures.push(format!("[flow] {who} {op} private/app: want {want:?}, got {detail}"));
            }
        }
    }
    assert_eq!(cells, 2 * 5 * 2 * 7 + 5 * 7);
    // The catalog lists what each identity may pull.
    let catalog_want: [(Want, &[&str]); 7] = [
        (Ok, &["public/app"]),
        (Ok, &["private/app", "public/app"]),
        (Ok, &["private/app", "public/app"]),
        (Ok, &["private/app", "public/app"]),
        (Unauth, &[]),
        (Unauth, &[]),
        (Ok, &["public/app"]),
    ];
    for (via_token, ((who, creds), (want, repos))) in [true, false]
        .into_iter()
        .flat_map(|t| identities.iter().zip(catalog_want.iter()).map(move |c| (t, c)))
    {
        let resp = present(
            creds,
            via_token,
            Method::GET,
            &s.server.v2("_catalog"),
            "registry:catalog:*",
        )
        .await;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let got = match status.as_u16() {
            200 => Ok,
            401 => Unauth,
            403 => Denied,
            other => panic!("catalog for {who}: {other}"),
        };
        if got != *want {
            failures.push(format!("{who} catalog: want {want:?}, got {status}"));
        } else if got == Ok {
            let listed: Vec<&str> = body["repositories"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            if listed != *repos {
                failures.push(format!("{who} catalog lists {listed:?}, want {repos:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "access matrix mismatches:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn challenges_name_realm_service_and_scope() {
    let s = AuthServer::start().await;
    let resp = client()
        .get(s.server.v2("private/app/manifests/v1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);
    let values: Vec<String> = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    assert_eq!(
        values,
        vec![
            format!(
                "Bearer realm=\"{}/token\",service=\"stowage\",scope=\"repository:private/app:pull\"",
                s.server.url
            ),
            format!("Basic realm=\"{}/token\"", s.server.url),
        ]
    );
    // `/v2/` offers Bearer alone: docker runs every handler whose scheme its `/v2/` ping saw,
    // and its Basic handler fails every request once `docker login` stored an identity token.
    let resp = client().get(s.server.v2("")).send().await.expect("GET /v2/");
    assert_eq!(resp.status(), 401);
    let values: Vec<String> = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    assert_eq!(
        values,
        vec![format!("Bearer realm=\"{}/token\",service=\"stowage\"", s.server.url)]
    );
    // A trusted proxy's forwarded scheme and host are not believed from anyone else.
    let resp = client()
        .post(s.server.v2("private/app/blobs/uploads/"))
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "evil.example")
        .send()
        .await
        .expect("POST");
    let c = bearer_challenge(&resp).expect("challenge");
    assert_eq!(param(&c, "realm"), Some(format!("{}/token", s.server.url).as_str()));
    assert_eq!(param(&c, "scope"), Some("repository:private/app:pull,push"));
    // /v2/ challenges anonymous clients (docker login checks credentials there).
    let resp = client().get(s.server.v2("")).send().await.expect("GET /v2/");
    assert_eq!(resp.status(), 401);
    let c = bearer_challenge(&resp).expect("challenge");
    assert_eq!(param(&c, "scope"), None);
    let ok = flow(&Creds::basic("reader", "reader-pw"), Method::GET, &s.server.v2("")).await;
    assert_eq!(ok.status(), 200);
    let bad = client()
        .get(s.server.v2(""))
        .basic_auth("reader", Some("wrong"))
        .send()
        .await
        .expect("GET /v2/");
    assert_eq!(bad.status(), 401);
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_make_an_https_realm() {
    let config = format!("{CONFIG}\n");
    let config = config.replace("max_failed_logins = 1000", "trusted_proxies = [\"127.0.0.1\"]");
    let s = AuthServer::start_with(&config).await;
    let resp = client()
        .get(s.server.v2("private/app/tags/list"))
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "registry.example.org")
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);
    let values: Vec<&str> = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(
        values,
        vec![
            "Bearer realm=\"https://registry.example.org/token\",service=\"stowage\",scope=\"repository:private/app:pull\""
        ],
        "https: Bearer only"
    );
}

/// An `application/x-www-form-urlencoded` body.
fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn token_for(s: &AuthServer, creds: &Creds, scope: &str) -> serde_json::Value {
    let resp = creds
        .apply(client().get(format!("{}/token", s.server.url)).query(&[
            ("service", "stowage"),
            ("scope", scope),
            ("client_id", "test"),
        ]))
        .send()
        .await
        .expect("token");
    assert_eq!(resp.status(), 200);
    resp.json().await.expect("json")
}

fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("claims json")
}

#[tokio::test]
async fn a_token_request_for_more_than_a_hundred_scopes_is_refused() {
    let s = AuthServer::start().await;
    let reader = Creds::basic("reader", "reader-pw");
    let many = |n: usize| {
        (0..n)
            .map(|i| format!("repository:public/r{i}:pull"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // A hundred is still a token (for what the reader may do).
    assert!(token_for(&s, &reader, &many(100)).await["token"].is_string());
    for post in [false, true] {
        let url = format!("{}/token", s.server.url);
        let scope = many(101);
        let req = if post {
            client()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(&[
                    ("grant_type", "password"),
                    ("username", "reader"),
                    ("password", "reader-pw"),
                    ("service", "stowage"),
                    ("scope", &scope),
                ]))
        } else {
            reader.apply(
                client()
                    .get(url)
                    .query(&[("service", "stowage"), ("scope", scope.as_str())]),
            )
        };
        let resp = req.send().await.expect("token request");
        assert_eq!(resp.status(), 400, "POST: {post}");
        let body = resp.text().await.expect("body");
        assert!(body.contains("too many scopes"), "{body}");
    }
}

#[tokio::test]
async fn tokens_grant_only_what_the_identity_may_and_insufficient_scope_is_401() {
    let s = AuthServer::start().await;
    let reader = Creds::basic("reader", "reader-pw");
    let body = token_for(&s, &reader, "repository:private/app:pull,push,delete").await;
    let token = body["token"].as_str().expect("token");
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').next().expect("header"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(header["alg"], "EdDSA");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
    let claims = claims_of(token);
    assert_eq!(claims["sub"], "reader");
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "private/app", "actions": ["pull"]}])
    );
    assert!(body["expires_in"].as_u64().is_some());

    // A pusher holding a pull-only token is told to fetch a better one.
    let pusher = Creds::basic("pusher", "pusher-pw");
    let pull_only = token_for(&s, &pusher, "repository:private/app:pull").await;
    let resp = client()
        .post(s.server.v2("private/app/blobs/uploads/"))
        .bearer_auth(pull_only["token"].as_str().expect("token"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 401);
    let c = bearer_challenge(&resp).expect("challenge");
    assert_eq!(param(&c, "error"), Some("insufficient_scope"));
    assert_eq!(param(&c, "scope"), Some("repository:private/app:pull,push"));

    // Wrong password at the token endpoint: 401.
    let resp = client()
        .get(format!("{}/token", s.server.url))
        .basic_auth("reader", Some("nope"))
        .query(&[("scope", "repository:private/app:pull")])
        .send()
        .await
        .expect("token");
    assert_eq!(resp.status(), 401);
}

/// Signs `user` in with `password` over the OAuth2 password grant, asking for a refresh token;
/// returns (access token, refresh token).
async fn password_grant(s: &AuthServer, user: &str, password: &str) -> (String, String) {
    let resp = client()
        .post(format!("{}/token", s.server.url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "password"),
            ("username", user),
            ("password", password),
            ("service", "stowage"),
            ("client_id", "test"),
            ("access_type", "offline"),
            ("scope", "repository:private/app:pull,push"),
        ]))
        .send()
        .await
        .expect("POST token");
    assert_eq!(resp.status(), 200, "password grant for {user}");
    let body: serde_json::Value = resp.json().await.expect("json");
    let field = |k: &str| body[k].as_str().expect(k).to_owned();
    (field("access_token"), field("refresh_token"))
}

/// Status of a refresh grant with `refresh`.
async fn refresh_status(s: &AuthServer, refresh: &str) -> u16 {
    client()
        .post(format!("{}/token", s.server.url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("service", "stowage"),
            ("scope", "repository:private/app:pull"),
        ]))
        .send()
        .await
        .expect("POST refresh")
        .status()
        .as_u16()
}

/// Tokens signed in with a password (access and refresh) end when the password changes, and
/// when the user is removed and re-created under the same name; API tokens live on.
#[tokio::test]
async fn password_change_ends_tokens_issued_on_the_old_password() {
    let s = AuthServer::start().await;
    let tags = s.server.v2("private/app/tags/list");
    let status = |token: String| {
        let tags = tags.clone();
        async move {
            client()
                .get(tags)
                .bearer_auth(token)
                .send()
                .await
                .expect("GET")
                .status()
                .as_u16()
        }
    };
    let api_token = s.token_create("pusher", "ci", "private/**:pull", &[]);
    let (access, refresh) = password_grant(&s, "pusher", "pusher-pw").await;
    assert_eq!(status(access.clone()).await, 200);
    assert_eq!(refresh_status(&s, &refresh).await, 200);

    stowage(s.server.data_dir(), &["user", "passwd", "pusher"], "new-pw\n");
    assert_eq!(status(access).await, 401, "access token from the old password");
    assert_eq!(
        refresh_status(&s, &refresh).await,
        401,
        "refresh token from the old password"
    );
    // The new password works, and its tokens do.
    let (access, refresh) = password_grant(&s, "pusher", "new-pw").await;
    assert_eq!(status(access.clone()).await, 200);
    assert_eq!(refresh_status(&s, &refresh).await, 200);
    // An API token is a credential of its own: a password change leaves it alone.
    let via_api = client()
        .get(&tags)
        .basic_auth("pusher", Some(&api_token))
        .send()
        .await
        .expect("GET");
    assert_eq!(via_api.status(), 200, "API token after the password change");

    // Removed and re-created under the same name (same password even): a new user.
    stowage(s.server.data_dir(), &["user", "remove", "pusher"], "");
    stowage(s.server.data_dir(), &["user", "add", "pusher"], "new-pw\n");
    assert_eq!(status(access).await, 401, "access token of the removed user");
    assert_eq!(
        refresh_status(&s, &refresh).await,
        401,
        "refresh token of the removed user"
    );
}

#[tokio::test]
async fn oauth2_post_password_and_refresh_grants() {
    let s = AuthServer::start().await;
    let url = format!("{}/token", s.server.url);
    let resp = client()
        .post(&url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "password"),
            ("username", "pusher"),
            ("password", "pusher-pw"),
            ("service", "stowage"),
            ("client_id", "containerd"),
            ("access_type", "offline"),
            ("scope", "repository:private/app:pull,push repository:public/app:pull"),
        ]))
        .send()
        .await
        .expect("POST token");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    let access = claims_of(body["access_token"].as_str().expect("access_token"));
    assert_eq!(access["access"].as_array().map(Vec::len), Some(2));
    let refresh = body["refresh_token"].as_str().expect("refresh_token").to_owned();
    // The refresh token is no access token.
    let resp = client()
        .get(s.server.v2("private/app/tags/list"))
        .bearer_auth(&refresh)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);
    let resp = client()
        .post(&url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("service", "stowage"),
            ("scope", "repository:private/app:push"),
        ]))
        .send()
        .await
        .expect("POST refresh");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    let token = body["token"].as_str().expect("token");
    let resp = client()
        .post(s.server.v2("private/app/blobs/uploads/"))
        .bearer_auth(token)
        .send()
        .await
        .expect("POST upload");
    assert_eq!(resp.status(), 202);
    // Removing the user ends the refresh token at once.
    stowage(s.server.data_dir(), &["user", "remove", "pusher"], "");
    let resp = client()
        .post(&url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
        ]))
        .send()
        .await
        .expect("POST refresh");
    assert_eq!(resp.status(), 401);
    let resp = client()
        .post(&url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[("grant_type", "client_credentials")]))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn forged_tokens_are_refused() {
    let s = AuthServer::start().await;
    let url = s.server.v2("private/app/manifests/v1");
    let all = vec![stowage::auth::jwt::AccessEntry::repository(
        "private/app",
        &[stowage::auth::Action::Pull],
    )];
    let good = s.craft_token("admin", all.clone(), 300, 0);
    let ok = client().get(&url).bearer_auth(&good).send().await.expect("GET");
    assert_eq!(ok.status(), 200, "the crafted token is valid as such");
    let b64 = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
    let parts: Vec<&str> = good.split('.').collect();
    let payload = claims_of(&good);
    let mut forged = vec![
        // alg none, no signature.
        format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]),
        // HMAC with the public key as secret (the classic algorithm confusion).
        {
            let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": claims_of_header(&good)});
            let signing_input = format!("{}.{}", b64(header.to_string().as_bytes()), parts[1]);
            let sig = aws_lc_rs::hmac::sign(
                &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"public key bytes"),
                signing_input.as_bytes(),
            );
            format!("{signing_input}.{}", b64(sig.as_ref()))
        },
        // Tampered payload under the original signature.
        {
            let mut p = payload.clone();
            p["sub"] = "someone-else".into();
            format!("{}.{}.{}", parts[0], b64(p.to_string().as_bytes()), parts[2])
        },
        // Expired, not yet valid.
        s.craft_token("admin", all.clone(), -60, -600),
        s.craft_token("admin", all.clone(), 900, 600),
        "garbage.in.here".to_owned(),
    ];
    // Signed by a key the server does not know.
    {
        let dir = tempfile::tempdir().expect("tmp");
        let keys = stowage::auth::KeySet::load(dir.path(), None, &[], 0).expect("keys");
        let mut claims: stowage::auth::Claims = serde_json::from_value(payload.clone()).expect("claims");
        claims.sub = "admin".into();
        forged.push(stowage::auth::jwt::sign(&keys, &claims).expect("sign"));
        // Wrong issuer and audience, with the right key.
    }
    for (field, value) in [("iss", "someone"), ("aud", "another-registry")] {
        let mut c: stowage::auth::Claims = serde_json::from_value(payload.clone()).expect("claims");
        if field == "iss" {
            c.iss = value.into();
        } else {
            c.aud = value.into();
        }
        let keys = stowage::auth::KeySet::load(&stowage::auth::keys::key_dir(s.server.data_dir()), None, &[], 0)
            .expect("keys");
        forged.push(stowage::auth::jwt::sign(&keys, &c).expect("sign"));
    }
    for (i, token) in forged.iter().enumerate() {
        let resp = client().get(&url).bearer_auth(token).send().await.expect("GET");
        assert_eq!(resp.status(), 401, "forged token #{i} refused");
        let c = bearer_challenge(&resp).expect("challenge");
        assert_eq!(param(&c, "error"), Some("invalid_token"), "forged token #{i}");
    }
    // A Bearer value that cannot be a token at all (Homebrew's `QQ==`) is no credential: the
    // client is challenged as an anonymous one, not told its token is invalid.
    let resp = client().get(&url).bearer_auth("garbage").send().await.expect("GET");
    assert_eq!(resp.status(), 401);
    let c = bearer_challenge(&resp).expect("challenge");
    assert_eq!(param(&c, "error"), None);
}

fn claims_of_header(token: &str) -> String {
    let header = token.split('.').next().expect("header");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("b64");
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    v["kid"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn revoking_an_api_token_takes_effect_at_once() {
    let s = AuthServer::start().await;
    let secret = s.token_create("pusher", "ci", "private/**:pull,push", &[]);
    let creds = Creds::basic("ci-bot", &secret);
    let url = s.server.v2("private/app/tags/list");
    // Basic straight to /v2/, and a registry token obtained through it.
    let basic = creds.apply(client().get(&url)).send().await.expect("GET");
    assert_eq!(basic.status(), 200);
    let token = token_for(&s, &creds, "repository:private/app:pull").await["token"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_eq!(claims_of(&token)["sub"], "pusher");
    let bearer = Creds::Bearer(token);
    assert_eq!(
        bearer.apply(client().get(&url)).send().await.expect("GET").status(),
        200
    );
    let list = stowage(s.server.data_dir(), &["token", "list", "--user", "pusher"], "");
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.contains("ci") && list.contains("live"), "{list}");
    assert!(!list.contains(&secret), "token list never shows a secret");

    stowage(s.server.data_dir(), &["token", "revoke", "ci", "--user", "pusher"], "");
    assert_eq!(creds.apply(client().get(&url)).send().await.expect("GET").status(), 401);
    assert_eq!(
        bearer.apply(client().get(&url)).send().await.expect("GET").status(),
        401
    );
    // An API token that has expired is refused too.
    let expired = s.token_create("pusher", "short", "private/**:pull", &["--expires-in-days", "0"]);
    let resp = Creds::basic("pusher", &expired)
        .apply(client().get(&url))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn an_upload_outlives_the_token_that_started_it() {
    let s = AuthServer::start().await;
    let push = vec![stowage::auth::jwt::AccessEntry::repository(
        "private/app",
        &[stowage::auth::Action::Pull, stowage::auth::Action::Push],
    )];
    let live = s.craft_token("pusher", push.clone(), 300, 0);
    let resp = client()
        .post(s.server.v2("private/app/blobs/uploads/"))
        .bearer_auth(&live)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().expect("location").to_owned();
    // The token has since expired: a new session is refused, the open one continues.
    let expired = s.craft_token("pusher", push, -60, -600);
    let resp = client()
        .post(s.server.v2("private/app/blobs/uploads/"))
        .bearer_auth(&expired)
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 401);
    let data = b"chunk of a long upload";
    let resp = client()
        .patch(format!("{}{location}", s.server.url))
        .bearer_auth(&expired)
        .header("Content-Type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .expect("PATCH");
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().expect("location").to_owned();
    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = client()
        .put(format!("{}{location}{sep}digest={}", s.server.url, sha256(data)))
        .bearer_auth(&expired)
        .send()
        .await
        .expect("PUT");
    assert_eq!(resp.status(), 201);
    // Anonymous clients still cannot touch a session.
    let resp = client()
        .get(format!("{}{location}", s.server.url))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn failed_logins_are_rate_limited() {
    // 127.0.0.1 is trusted as a proxy, so X-Forwarded-For stands for a second client address.
    let s = AuthServer::start_with(&CONFIG.replace(
        "max_failed_logins = 1000",
        "max_failed_logins = 3\nfailed_login_backoff_secs = 60\ntrusted_proxies = [\"127.0.0.1\"]",
    ))
    .await;
    let url = s.server.v2("private/app/tags/list");
    for _ in 0..3 {
        let resp = client()
            .get(&url)
            .basic_auth("reader", Some("bad"))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 401);
    }
    // From this address the right password now waits too: nothing tells it from a guess.
    let resp = client()
        .get(&url)
        .basic_auth("reader", Some("reader-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let body = resp.text().await.expect("body");
    assert!(
        body.contains("TOOMANYREQUESTS") && body.contains("too many failed logins"),
        "{body}"
    );
    // The user is not locked out elsewhere, and other users are not locked out from here.
    let resp = client()
        .get(&url)
        .header("X-Forwarded-For", "198.51.100.7")
        .basic_auth("reader", Some("reader-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let resp = client()
        .get(&url)
        .basic_auth("pusher", Some("pusher-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn default_configuration_requires_credentials_and_says_so() {
    // No [auth] section at all: secure by default.
    let server = TestServer::start_with(&[("STOWAGE_AUTH__ENABLED", "true")]);
    let resp = client()
        .post(server.v2("any/repo/blobs/uploads/"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 401);
    let resp = client().get(server.v2("any/repo/tags/list")).send().await.expect("GET");
    assert_eq!(resp.status(), 401);
    let key_dir = stowage::auth::keys::key_dir(server.data_dir());
    let keys: Vec<_> = std::fs::read_dir(&key_dir).expect("key dir").collect();
    assert_eq!(keys.len(), 1);
    use std::os::unix::fs::PermissionsExt as _;
    let path = keys[0].as_ref().expect("entry").path();
    assert_eq!(
        std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
        0o600
    );
}

// ---------------------------------------------------------------------------------------------
// Real clients through the token flow. The tools are installed by `scripts/test`; when one is
// missing these tests fail saying so (tests/clients.rs does the same).
// ---------------------------------------------------------------------------------------------

fn require_tool(name: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|c| c.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed; scripts/test installs it"))
}

fn run_tool(cmd: &mut Command) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

#[tokio::test]
async fn skopeo_pulls_and_pushes_with_credentials() {
    let s = AuthServer::start().await;
    let skopeo = require_tool("skopeo");
    let scratch = tempfile::tempdir().expect("tmp");
    let auth_file = scratch.path().join("auth.json");
    std::fs::write(&auth_file, r#"{"auths":{}}"#).expect("auth file");
    let host = s.server.host.clone();
    let layout = format!("oci:{}:v1", scratch.path().join("layout").display());
    let sk = |args: &[&str]| {
        let mut cmd = Command::new(&skopeo);
        cmd.arg("--insecure-policy")
            .env("REGISTRY_AUTH_FILE", &auth_file)
            .env("TMPDIR", scratch.path())
            .args(args);
        run_tool(&mut cmd)
    };
    let ok = |out: std::process::Output, what: &str| {
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    // Anonymous: refused on a private repository, fine on a public one.
    let src = format!("docker://{host}/private/app:v1");
    let denied = sk(&["copy", "--src-tls-verify=false", &src, &layout]);
    assert!(
        !denied.status.success(),
        "anonymous skopeo pull of a private image must fail"
    );
    ok(
        sk(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{host}/public/app:v1"),
            &layout,
        ]),
        "anonymous pull of a public image",
    );
    // The reader pulls the private image; may not push.
    ok(
        sk(&[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            "reader:reader-pw",
            &src,
            &layout,
        ]),
        "reader pulls",
    );
    let dest = format!("docker://{host}/private/copied:v1");
    let refused = sk(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "reader:reader-pw",
        &layout,
        &dest,
    ]);
    assert!(!refused.status.success(), "reader may not push");
    // The pusher pushes, with its password and with an API token as the password.
    ok(
        sk(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "pusher:pusher-pw",
            &layout,
            &dest,
        ]),
        "pusher pushes",
    );
    let token = s.token_create("pusher", "skopeo", "private/**:pull,push", &[]);
    let dest2 = format!("docker://{host}/private/copied:v2");
    ok(
        sk(&[
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("ci:{token}"),
            &layout,
            &dest2,
        ]),
        "API token pushes",
    );
    let tags = ok(
        sk(&[
            "list-tags",
            "--tls-verify=false",
            "--creds",
            "reader:reader-pw",
            &format!("docker://{host}/private/copied"),
        ]),
        "list-tags",
    );
    let tags: serde_json::Value = serde_json::from_slice(&tags.stdout).expect("json");
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2"]));
}

#[tokio::test]
async fn oras_logs_in_pushes_and_pulls() {
    let s = AuthServer::start().await;
    let python = std::env::var("ORAS_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let work = tempfile::tempdir().expect("tmp");
    let script = r#"
import os, sys
import oras.client, oras.provider
oras.provider.Registry.do_request = oras.provider.Registry.do_request.__wrapped__
host, work, user, password = sys.argv[1:5]
os.chdir(work)
with open("hello.txt", "w") as f:
    f.write("hello from oras\n")
# oras-py's token backend keeps the first token it gets (login's, for no scope) and only fetches
# another after a 403, never after a 401 insufficient_scope; its basic backend sends the
# credentials straight to /v2/, which Stowage accepts.
c = oras.client.OrasClient(hostname=host, insecure=True, auth_backend="basic")
c.login(username=user, password=password, hostname=host, tls_verify=False,
        config_path=os.path.join(work, "config.json"))
c.push(target=f"{host}/private/oras:v1", files=["hello.txt"])
got = c.pull(target=f"{host}/private/oras:v1", outdir=os.path.join(work, "out"))
data = open(got[0]).read()
assert data == "hello from oras\n", data
print("ORAS_AUTH_OK")
"#;
    let out = run_tool(
        Command::new(&python)
            .args(["-c", script, &s.server.host, work.path().to_str().expect("utf-8")])
            .args(["pusher", "pusher-pw"]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ORAS_AUTH_OK"),
        "oras: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The reader cannot push.
    let out = run_tool(
        Command::new(&python)
            .args(["-c", script, &s.server.host, work.path().to_str().expect("utf-8")])
            .args(["reader", "reader-pw"]),
    );
    assert!(!out.status.success(), "oras push as reader must fail");
}

#[tokio::test]
async fn oci_client_crate_pushes_and_pulls_with_basic_credentials() {
    use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
    use oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE;
    use oci_client::secrets::RegistryAuth;
    use oci_client::{Client, Reference};

    let s = AuthServer::start().await;
    let c = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: Reference = format!("{}/private/oci-client:v1", s.server.host)
        .parse()
        .expect("reference");
    let layers = vec![ImageLayer::oci_v1(b"layer bytes".to_vec(), None)];
    let config = Config::oci_v1(br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), None);
    let reader = RegistryAuth::Basic("reader".into(), "reader-pw".into());
    assert!(
        c.push(&reference, &layers, config.clone(), &reader, None)
            .await
            .is_err(),
        "reader may not push"
    );
    let pusher = RegistryAuth::Basic("pusher".into(), "pusher-pw".into());
    let c = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    c.push(&reference, &layers, config, &pusher, None)
        .await
        .expect("push with credentials");
    let c = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let image = c
        .pull(&reference, &reader, vec![IMAGE_LAYER_MEDIA_TYPE])
        .await
        .expect("reader pulls");
    assert_eq!(image.layers[0].data.as_ref(), b"layer bytes");
    let anonymous = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    assert!(
        anonymous
            .pull(&reference, &RegistryAuth::Anonymous, vec![IMAGE_LAYER_MEDIA_TYPE])
            .await
            .is_err(),
        "anonymous may not pull a private image"
    );
}

/// `stowage user admin` gives and takes the admin role, with effect on the next request.
#[tokio::test]
async fn admin_role_is_granted_and_revoked_from_the_cli() {
    let s = AuthServer::start().await;
    s.push_image("private/app", "v2").await;
    let reader = Creds::basic("reader", "reader-pw");
    let delete = |tag: &str| {
        reader
            .apply(client().delete(s.server.v2(&format!("private/app/manifests/{tag}"))))
            .send()
    };
    assert_eq!(
        delete("v1").await.expect("DELETE").status(),
        403,
        "a reader may not delete"
    );

    stowage(s.server.data_dir(), &["user", "admin", "reader"], "");
    assert_eq!(delete("v1").await.expect("DELETE").status(), 202, "an admin may");

    stowage(s.server.data_dir(), &["user", "admin", "reader", "--revoke"], "");
    assert_eq!(delete("v2").await.expect("DELETE").status(), 403, "no longer an admin");

    let unknown = s
        .server
        .stowage_command(&["user", "admin", "nobody"])
        .output()
        .expect("run stowage");
    assert!(!unknown.status.success(), "an unknown user is an error");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no user nobody"));
}

/// A 401's `error` challenge parameter and its body's message, after checking the body is an
/// OCI `UNAUTHORIZED` error.
async fn unauthorized(resp: reqwest::Response) -> (Option<String>, String) {
    let error = bearer_challenge(&resp).and_then(|c| param(&c, "error").map(str::to_owned));
    let body = common::oci::assert_error(resp, 401, &["UNAUTHORIZED"]).await;
    let message = body["errors"][0]["message"].as_str().expect("message").to_owned();
    assert_ne!(message, "authentication required", "never the code's default text");
    (error, message)
}

/// Each kind of refused credential is told why, on requests and at the token endpoint: a token
/// lacking a scope names the repository and action (with `insufficient_scope`), a revoked or
/// expired API token says so and names itself, an expired registry token says it expired, a
/// forged one that it is invalid, an invalid refresh token that it is invalid.
#[tokio::test]
async fn refusals_say_why() {
    let s = AuthServer::start().await;
    let uploads = s.server.v2("private/app/blobs/uploads/");
    let tags = s.server.v2("private/app/tags/list");

    // Insufficient scope: the challenge asks for the scope, the message names repository and
    // action.
    let pull_only = token_for(&s, &Creds::basic("pusher", "pusher-pw"), "repository:private/app:pull").await;
    let resp = client()
        .post(&uploads)
        .bearer_auth(pull_only["token"].as_str().expect("token"))
        .send()
        .await
        .expect("POST");
    let (error, message) = unauthorized(resp).await;
    assert_eq!(error.as_deref(), Some("insufficient_scope"));
    assert!(
        message.contains("does not grant push on repository private/app"),
        "{message}"
    );
    // The same for delete, on a manifest, for an admin holding a pull-only token.
    let admin_pull = token_for(&s, &Creds::basic("admin", "admin-pw"), "repository:private/app:pull").await;
    let resp = client()
        .delete(s.server.v2("private/app/manifests/v1"))
        .bearer_auth(admin_pull["token"].as_str().expect("token"))
        .send()
        .await
        .expect("DELETE");
    let (_, message) = unauthorized(resp).await;
    assert!(
        message.contains("does not grant delete on repository private/app"),
        "{message}"
    );

    // A revoked API token, as the password and behind a registry token, and at /token.
    let secret = s.token_create("pusher", "ci", "private/**:pull,push", &[]);
    let api = Creds::basic("pusher", &secret);
    let bearer = Creds::Bearer(
        token_for(&s, &api, "repository:private/app:pull").await["token"]
            .as_str()
            .expect("token")
            .to_owned(),
    );
    stowage(s.server.data_dir(), &["token", "revoke", "ci", "--user", "pusher"], "");
    let revoked = r#"the API token "ci" of user pusher has been revoked"#;
    for (what, creds) in [("as the password", &api), ("behind a registry token", &bearer)] {
        let (_, message) = unauthorized(creds.apply(client().get(&tags)).send().await.expect("GET")).await;
        assert!(message.contains(revoked), "{what}: {message}");
    }
    let resp = api
        .apply(client().get(format!("{}/token", s.server.url)))
        .query(&[("scope", "repository:private/app:pull")])
        .send()
        .await
        .expect("GET /token");
    let (_, message) = unauthorized(resp).await;
    assert!(message.contains(revoked), "at /token: {message}");
    let resp = client()
        .post(format!("{}/token", s.server.url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "password"),
            ("username", "pusher"),
            ("password", &secret),
            ("service", "stowage"),
        ]))
        .send()
        .await
        .expect("POST /token");
    let (_, message) = unauthorized(resp).await;
    assert!(message.contains(revoked), "POST /token: {message}");

    // An expired API token.
    let short = s.token_create("pusher", "short", "private/**:pull", &["--expires-in-days", "0"]);
    let resp = Creds::basic("pusher", &short)
        .apply(client().get(&tags))
        .send()
        .await
        .expect("GET");
    let (_, message) = unauthorized(resp).await;
    assert!(
        message.contains(r#"the API token "short" of user pusher has expired"#),
        "{message}"
    );

    // An unknown API token and a wrong password are wrong credentials.
    for password in ["stw_0000000000000000000000000000000000000000", "nope"] {
        let resp = Creds::basic("pusher", password)
            .apply(client().get(&tags))
            .send()
            .await
            .expect("GET");
        let (_, message) = unauthorized(resp).await;
        assert!(message.contains("wrong user name or password"), "{message}");
    }

    // An expired registry token and a forged one.
    let pull = vec![stowage::auth::jwt::AccessEntry::repository(
        "private/app",
        &[stowage::auth::Action::Pull],
    )];
    let expired = s.craft_token("pusher", pull, -60, -600);
    let resp = client().get(&tags).bearer_auth(&expired).send().await.expect("GET");
    let (error, message) = unauthorized(resp).await;
    assert_eq!(error.as_deref(), Some("invalid_token"));
    assert!(message.contains("the registry token has expired"), "{message}");
    let resp = client()
        .get(&tags)
        .bearer_auth("garbage.in.here")
        .send()
        .await
        .expect("GET");
    let (error, message) = unauthorized(resp).await;
    assert_eq!(error.as_deref(), Some("invalid_token"));
    assert!(message.contains("the registry token is invalid"), "{message}");

    // An invalid refresh token at the token endpoint.
    let resp = client()
        .post(format!("{}/token", s.server.url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", "garbage.in.here"),
            ("service", "stowage"),
        ]))
        .send()
        .await
        .expect("POST refresh");
    let (_, message) = unauthorized(resp).await;
    assert!(message.contains("the refresh token is invalid"), "{message}");
}

/// Every credential a client can repeat is remembered by the server after its first use (a
/// verified registry token, a user, an API token by id and by secret); each change that
/// should end one is honoured on the very next request all the same: an API token revoked, a
/// password changed, a user removed. Other users' remembered credentials keep working.
#[tokio::test]
async fn cached_credentials_end_on_the_next_request_after_each_change() {
    let s = AuthServer::start().await;
    let url = s.server.v2("private/app/tags/list");
    let get = |creds: Creds| {
        let url = url.clone();
        async move {
            creds
                .apply(client().get(url))
                .send()
                .await
                .expect("GET")
                .status()
                .as_u16()
        }
    };
    let scope = "repository:private/app:pull";
    stowage(s.server.data_dir(), &["user", "add", "carol"], "carol-pw\n");
    let secret = s.token_create("pusher", "ci", "private/**:pull", &[]);
    let carol_secret = s.token_create("carol", "laptop", "private/**:pull", &[]);
    let cases = [
        ("reader's password", Creds::basic("reader", "reader-pw")),
        ("pusher's API token", Creds::basic("ci", &secret)),
        ("carol's password", Creds::basic("carol", "carol-pw")),
        ("carol's API token", Creds::basic("carol", &carol_secret)),
    ];
    let mut all = Vec::new();
    for (what, creds) in cases {
        let token = token_for(&s, &creds, scope).await["token"]
            .as_str()
            .expect("token")
            .to_owned();
        all.push((format!("{what} bearer"), Creds::Bearer(token)));
        all.push((format!("{what} basic"), creds));
    }
    // Used again and again: every one of them is remembered now.
    for _ in 0..5 {
        for (what, creds) in &all {
            assert_eq!(get(creds.clone()).await, 200, "{what}");
        }
    }
    let expect = |refused: &'static [&'static str]| {
        let all = all.clone();
        async move {
            for (what, creds) in &all {
                let want = if refused.iter().any(|r| what.starts_with(r)) {
                    401
                } else {
                    200
                };
                assert_eq!(get(creds.clone()).await, want, "{what}");
            }
        }
    };

    stowage(s.server.data_dir(), &["token", "revoke", "ci", "--user", "pusher"], "");
    expect(&["pusher's API token"]).await;

    stowage(s.server.data_dir(), &["user", "passwd", "reader"], "reader-new-pw\n");
    expect(&["pusher's API token", "reader's password"]).await;
    assert_eq!(
        get(Creds::basic("reader", "reader-new-pw")).await,
        200,
        "the new password"
    );

    stowage(s.server.data_dir(), &["user", "remove", "carol"], "");
    expect(&["pusher's API token", "reader's password", "carol's"]).await;
}
