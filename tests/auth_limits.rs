//! Authentication under attack, over real HTTP against the real binary: concurrent wrong
//! logins keep the server's memory bounded (argon2 verifications are limited and throttled
//! attempts are refused before hashing), an attacker guessing a user's password from one
//! address does not lock that user out elsewhere nor block their API tokens, a token scoped to
//! other repositories still pulls what anonymous clients may, and an expired token continues an
//! upload only within `auth.upload_token_grace_secs`.
//!
//! Client addresses are simulated with `X-Forwarded-For`: the servers here trust 127.0.0.1 as
//! a proxy, so a request carrying `X-Forwarded-For: 203.0.113.66` comes from that address, and
//! one without the header from 127.0.0.1 itself.
//!
//! With a PostgreSQL catalog, replicas share failed logins: `replicas_share_failed_logins` runs
//! two servers on one database (on PostgreSQL and S3 whatever the environment says); the other
//! tests run on the catalog `STOWAGE_TEST_CATALOG` names, and check that SQLite's limiter
//! leaves nothing in the catalog.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Backend, Catalog, TestServer, client, metric, sha256};

/// Runs an admin command; returns what it printed, trimmed.
fn stowage(data_dir: &Path, args: &[&str], stdin: &str) -> String {
    let out = common::run_cli(data_dir, args, stdin);
    String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
}
use futures_util::FutureExt as _;
use futures_util::future::join_all;
use reqwest::{Method, RequestBuilder, Response};

const ATTACKER: &str = "203.0.113.66";
const ELSEWHERE: &str = "198.51.100.7";

const BASE_CONFIG: &str = r#"
[auth]
enabled = true
trusted_proxies = ["127.0.0.1"]
anonymous_pull = ["public/**"]
"#;

/// A server with authentication on (`extra` appended to the `[auth]` section), and users
/// `pusher` (password `pusher-pw`) and `admin` (`admin-pw`, an admin).
struct Server {
    server: TestServer,
    /// The config file's directory (replicas share it).
    _config: std::sync::Arc<tempfile::TempDir>,
}

impl Server {
    fn start(extra: &str) -> Server {
        Self::start_on(common::backend(), common::catalog(), extra)
    }

    fn start_on(backend: Backend, catalog: Catalog, extra: &str) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stowage.toml");
        std::fs::write(&path, format!("{BASE_CONFIG}{extra}\n")).expect("write config");
        let server = TestServer::start_on_backend_and_catalog(
            backend,
            catalog,
            &[
                ("STOWAGE_CONFIG", path.to_str().expect("utf-8 path")),
                ("STOWAGE_AUTH__ENABLED", "true"),
            ],
        );
        stowage(server.data_dir(), &["user", "add", "pusher"], "pusher-pw\n");
        stowage(server.data_dir(), &["user", "add", "admin", "--admin"], "admin-pw\n");
        Server {
            server,
            _config: std::sync::Arc::new(dir),
        }
    }

    /// Two replicas on one PostgreSQL database and S3 bucket, with the same settings and users.
    fn start_replicas(extra: &str) -> (Server, Server) {
        let a = Self::start_on(Backend::S3, Catalog::Postgres, extra);
        let config = a._config.path().join("stowage.toml");
        let envs = [
            ("STOWAGE_CONFIG", config.to_str().expect("utf-8 path")),
            ("STOWAGE_AUTH__ENABLED", "true"),
        ];
        let b = Server {
            server: TestServer::start_sharing(&a.server, &envs),
            _config: a._config.clone(),
        };
        (a, b)
    }

    /// The shared limiter's rows: (key, failures, blocked until in unix ms).
    fn throttle_rows(&self) -> Vec<(Vec<u8>, i64, i64)> {
        self.server
            .catalog_sql()
            .query_rows(
                "SELECT key, failures, blocked_until_ms FROM login_throttle ORDER BY key",
                &[],
            )
            .into_iter()
            .map(|r| match &r[..] {
                [common::sql::Value::Bytes(key), failures, until] => (key.clone(), failures.int(), until.int()),
                other => panic!("a login_throttle row: {other:?}"),
            })
            .collect()
    }

    fn token_create(&self, user: &str, scope: &str) -> String {
        let args = ["token", "create", "--user", user, "--name", "t", "--scope", scope];
        stowage(self.server.data_dir(), &args, "")
    }

    fn token_url(&self) -> String {
        format!("{}/token", self.server.url)
    }

    /// A registry token signed with the server's own key, for `sub`, granting `access`, that
    /// expires `exp_offset` seconds from now.
    fn craft_token(&self, sub: &str, access: Vec<stowage::auth::jwt::AccessEntry>, exp_offset: i64) -> String {
        let keys = stowage::auth::KeySet::load(&stowage::auth::keys::key_dir(self.server.data_dir()), None, &[], 0)
            .expect("load the server's keys");
        let epoch = self
            .server
            .catalog_sql()
            .query_i64("SELECT credentials_epoch FROM users WHERE name = ?1", &[sub.into()]);
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let claims = stowage::auth::Claims {
            iss: "stowage".into(),
            sub: sub.into(),
            aud: "stowage".into(),
            exp: (now + exp_offset) as u64,
            nbf: (now - 3600) as u64,
            iat: (now - 3600) as u64,
            jti: "test".into(),
            access,
            tid: None,
            token_use: stowage::auth::TokenUse::Access,
            epoch,
        };
        stowage::auth::jwt::sign(&keys, &claims).expect("sign")
    }

    /// Peak resident memory of the server process, in KiB (`VmHWM`).
    fn peak_rss_kib(&self) -> u64 {
        proc_status(self.server.pid(), "VmHWM")
    }
}

/// A field of `/proc/<pid>/status`, as a number (`VmHWM:  123456 kB` → 123456).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a number in {line:?}"))
}

/// What a client presents, and from which address.
#[derive(Clone)]
struct As {
    creds: Creds,
    from: Option<&'static str>,
}

#[derive(Clone)]
enum Creds {
    None,
    Basic(String, String),
    Bearer(String),
}

impl As {
    fn basic(user: &str, password: &str, from: Option<&'static str>) -> As {
        As {
            creds: Creds::Basic(user.into(), password.into()),
            from,
        }
    }

    fn bearer(token: &str, from: Option<&'static str>) -> As {
        As {
            creds: Creds::Bearer(token.into()),
            from,
        }
    }

    fn apply(&self, rb: RequestBuilder) -> RequestBuilder {
        let rb = match self.from {
            Some(addr) => rb.header("X-Forwarded-For", addr),
            None => rb,
        };
        match &self.creds {
            Creds::None => rb,
            Creds::Basic(u, p) => rb.basic_auth(u, Some(p)),
            Creds::Bearer(t) => rb.bearer_auth(t),
        }
    }

    async fn send(&self, method: Method, url: &str, body: Option<Vec<u8>>) -> Response {
        self.send_on(&client(), method, url, body).await
    }

    /// `send` through a given client (one client for a burst, so that building hundreds of
    /// clients does not slow the burst down).
    async fn send_on(&self, c: &reqwest::Client, method: Method, url: &str, body: Option<Vec<u8>>) -> Response {
        let mut rb = self.apply(c.request(method, url));
        if let Some(body) = body {
            rb = rb.header("Content-Type", "application/octet-stream").body(body);
        }
        rb.send().await.expect("request")
    }

    /// A registry token from `POST /token` (the OAuth2 password grant docker uses).
    async fn password_grant(&self, s: &Server, scope: &str) -> Response {
        let Creds::Basic(user, password) = &self.creds else {
            panic!("a password grant needs a password")
        };
        let form = [
            ("grant_type", "password"),
            ("username", user.as_str()),
            ("password", password.as_str()),
            ("service", "stowage"),
            ("scope", scope),
            ("client_id", "test"),
        ];
        let rb = client()
            .post(s.token_url())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form_encode(&form));
        let rb = match self.from {
            Some(addr) => rb.header("X-Forwarded-For", addr),
            None => rb,
        };
        rb.send().await.expect("POST /token")
    }

    /// Pushes a small image `repo:tag` (two blobs and a manifest) and pulls its manifest back;
    /// panics on any refusal.
    async fn push_and_pull(&self, s: &Server, repo: &str, tag: &str) {
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let layer = format!("layer of {repo}:{tag}").into_bytes();
        for blob in [&config, &layer] {
            let url = s.server.v2(&format!("{repo}/blobs/uploads/?digest={}", sha256(blob)));
            let resp = self.send(Method::POST, &url, Some(blob.clone())).await;
            assert_eq!(
                resp.status(),
                201,
                "blob push: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer), "size": layer.len()}],
        });
        let url = s.server.v2(&format!("{repo}/manifests/{tag}"));
        let resp = self
            .apply(
                client()
                    .put(&url)
                    .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                    .body(manifest.to_string()),
            )
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(
            resp.status(),
            201,
            "manifest push: {}",
            resp.text().await.unwrap_or_default()
        );
        self.pull(s, repo, tag).await;
    }

    /// GETs the manifest `repo:tag`; panics unless 200.
    async fn pull(&self, s: &Server, repo: &str, tag: &str) {
        let url = s.server.v2(&format!("{repo}/manifests/{tag}"));
        let resp = self
            .apply(
                client()
                    .get(&url)
                    .header("Accept", "application/vnd.oci.image.manifest.v1+json"),
            )
            .send()
            .await
            .expect("GET manifest");
        assert_eq!(
            resp.status(),
            200,
            "pull {repo}:{tag}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
fn form_encode(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
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

/// Asserts a throttling answer: 429 `TOOMANYREQUESTS`, a `Retry-After` of at most `max` seconds,
/// and a message that says what happened.
async fn assert_throttled(resp: Response, max: u64, says: &str) {
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=max).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = resp.json().await.expect("OCI error body");
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    let message = body["errors"][0]["message"].as_str().expect("message");
    assert!(message.contains(says), "message {message:?} should say {says:?}");
}

/// Sends wrong passwords for `user` from `from` until one is refused with 429; returns how many
/// were answered 401 first.
async fn guess_until_throttled(s: &Server, user: &str, from: &'static str) -> usize {
    let url = s.server.v2("");
    for n in 0..100 {
        let resp = As::basic(user, &format!("guess-{n}"), Some(from))
            .send(Method::GET, &url, None)
            .await;
        match resp.status().as_u16() {
            401 => {
                let body = resp.text().await.unwrap_or_default();
                assert!(body.contains("wrong user name or password"), "401 body: {body}");
            }
            429 => return n,
            other => panic!("wrong password answered {other}"),
        }
    }
    panic!("100 wrong passwords were never throttled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wrong_logins_keep_memory_bounded() {
    let s = Server::start("");
    let baseline = s.peak_rss_kib();
    let v2 = s.server.v2("");
    let token_get = format!("{}?service=stowage&scope=repository:private/app:pull", s.token_url());

    // 200 wrong logins from one address on /v2/ and 200 on /token, all at once.
    let started = Instant::now();
    let burst_client = client();
    let one_address = (0..400).map(|n| {
        let who = As::basic("pusher", &format!("wrong-{n}"), Some(ATTACKER));
        let url = if n % 2 == 0 { v2.clone() } else { token_get.clone() };
        let c = burst_client.clone();
        async move { who.send_on(&c, Method::GET, &url, None).await.status().as_u16() }
    });
    let statuses = join_all(one_address).await;
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "only 401 and 429: {statuses:?}"
    );
    // The address's allowance (15) bounds how many were verified; the rest waited for nothing.
    assert!(refused >= 400 - 15, "{refused} of 400 refused before hashing");

    // 200 wrong logins from 200 addresses for 200 names: the limiter lets each through, the
    // verification permits bound them.
    let addresses: Vec<&'static str> = (0..200)
        .map(|n| &*Box::leak(format!("192.0.2.{n}").into_boxed_str()))
        .collect();
    let spread = addresses.iter().enumerate().map(|(n, addr)| {
        let who = As::basic(&format!("user{n}"), "wrong", Some(addr));
        let url = if n % 2 == 0 { v2.clone() } else { token_get.clone() };
        let c = burst_client.clone();
        async move {
            let resp = who.send_on(&c, Method::GET, &url, None).await;
            let status = resp.status().as_u16();
            if status == 429 {
                assert_throttled(resp, 1, "try again").await;
            }
            status
        }
    });
    let statuses = join_all(spread).await;
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "only 401 and 429: {statuses:?}"
    );
    assert!(statuses.contains(&401), "some were verified: {statuses:?}");
    let elapsed = started.elapsed();

    let peak = s.peak_rss_kib();
    let threads = proc_status(s.server.pid(), "Threads");
    eprintln!(
        "600 wrong logins in {elapsed:?}: peak RSS {} MiB (at start {} MiB), {threads} threads, {} of the spread ones refused",
        peak / 1024,
        baseline / 1024,
        statuses.iter().filter(|s| **s == 429).count()
    );
    assert!(peak < 256 * 1024, "peak RSS {} MiB", peak / 1024);

    // The server still answers: the right password from another address, at once.
    let t = Instant::now();
    let resp = As::basic("pusher", "pusher-pw", Some(ELSEWHERE))
        .send(Method::GET, &v2, None)
        .await;
    assert_eq!(resp.status(), 200);
    assert!(t.elapsed() < Duration::from_secs(5), "answered in {:?}", t.elapsed());
}

#[tokio::test]
async fn a_user_keeps_working_while_an_attacker_guesses_their_password() {
    let s = Server::start("max_failed_logins = 3\nfailed_login_backoff_secs = 60\n");
    // The user works from 127.0.0.1 before the attack.
    let home = As::basic("pusher", "pusher-pw", None);
    home.push_and_pull(&s, "team/app", "before").await;

    assert_eq!(guess_until_throttled(&s, "pusher", ATTACKER).await, 3);
    // SQLite's limiter is in memory only; with PostgreSQL the replicas' shared rows are the
    // pair's and the address's.
    let shared = s.throttle_rows();
    match s.server.catalog {
        Catalog::Sqlite => assert!(shared.is_empty(), "{shared:?}"),
        Catalog::Postgres => assert_eq!(shared.iter().map(|r| r.1).collect::<Vec<_>>(), [3, 3], "{shared:?}"),
    }
    // Concurrent guesses cannot get around it: every one is refused before hashing.
    let burst = (0..50).map(|n| {
        let who = As::basic("pusher", &format!("burst-{n}"), Some(ATTACKER));
        let url = s.server.v2("");
        async move { who.send(Method::GET, &url, None).await }
    });
    for resp in join_all(burst).await {
        assert_throttled(resp, 60, "too many failed logins").await;
    }

    // While the attacker keeps guessing, the user keeps working: Basic straight to /v2/ from
    // the address they always used, and the token flow from another address.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack = {
        let stop = stop.clone();
        let url = s.server.v2("team/app/tags/list");
        tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = As::basic("pusher", &format!("more-{sent}"), Some(ATTACKER))
                    .send(Method::GET, &url, None)
                    .await;
                assert_eq!(resp.status(), 429, "a guess while blocked");
                sent += 1;
            }
            sent
        })
    };
    home.push_and_pull(&s, "team/app", "during").await;
    let elsewhere = As::basic("pusher", "pusher-pw", Some(ELSEWHERE));
    elsewhere.push_and_pull(&s, "team/app", "elsewhere").await;
    let resp = elsewhere.password_grant(&s, "repository:team/app:pull,push").await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("token json");
    let token = body["token"].as_str().expect("token");
    As::bearer(token, Some(ELSEWHERE))
        .push_and_pull(&s, "team/app", "via-token")
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = attack.await.expect("attacker task");
    assert!(sent > 0);

    // From the attacker's own address the right password waits too: nothing tells the two
    // apart there (API tokens do; see the next test).
    let resp = As::basic("pusher", "pusher-pw", Some(ATTACKER))
        .send(Method::GET, &s.server.v2(""), None)
        .await;
    assert_throttled(resp, 60, "too many failed logins").await;
    let resp = As::basic("pusher", "pusher-pw", Some(ATTACKER))
        .password_grant(&s, "repository:team/app:pull")
        .await;
    assert_throttled(resp, 60, "too many failed logins").await;
}

/// Two replicas of one PostgreSQL catalog: failures sent to one block the attempts sent to the
/// other, which never saw them, before any password is checked there; a success at the other
/// once the block is over clears the pair for both.
#[tokio::test]
async fn replicas_share_failed_logins() {
    let (a, b) = Server::start_replicas("max_failed_logins = 2\nfailed_login_backoff_secs = 5\n");
    let right = As::basic("pusher", "pusher-pw", Some(ATTACKER));
    let status = |s: &Server, who: &As| {
        let (who, url) = (who.clone(), s.server.v2(""));
        async move { who.send(Method::GET, &url, None).await.status().as_u16() }
    };

    assert_eq!(guess_until_throttled(&a, "pusher", ATTACKER).await, 2);
    // B saw no failure, and the right password from that address is refused before it is
    // checked (checked, it would get in).
    let resp = right.send(Method::GET, &b.server.v2(""), None).await;
    assert_throttled(resp, 5, "too many failed logins").await;
    assert_eq!(
        metric(&b.server, "stowage_auth_failed_logins_total", &[]).await,
        0.0,
        "B counted no failure of its own"
    );
    assert_eq!(metric(&a.server, "stowage_auth_failed_logins_total", &[]).await, 2.0);
    // Only the pair is blocked: another user from that address, and the user from elsewhere,
    // get in at B.
    assert_eq!(status(&b, &As::basic("admin", "admin-pw", Some(ATTACKER))).await, 200);
    assert_eq!(
        status(&b, &As::basic("pusher", "pusher-pw", Some(ELSEWHERE))).await,
        200
    );

    // The catalog holds the limiter's fixed-size keys, never the user name.
    let rows = a.throttle_rows();
    assert_eq!(rows.len(), 2, "the pair and the address: {rows:?}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    for (key, failures, until) in &rows {
        assert!(!key.windows(6).any(|w| w == b"pusher"), "{key:?}");
        match key.len() {
            33 => assert!(*failures == 2 && *until > now_ms, "the pair: blocked, {rows:?}"),
            17 => assert!(*failures == 2 && *until == 0, "the address: not blocked, {rows:?}"),
            n => panic!("a key of {n} bytes"),
        }
    }

    // Once the block is over, the right password gets in at B and clears the pair's row (the
    // address's stays).
    common::wait_until("the right password gets in at B", || {
        status(&b, &right).map(|s| s == 200)
    })
    .await;
    let rows = a.throttle_rows();
    assert_eq!(rows.iter().map(|r| r.0.len()).collect::<Vec<_>>(), [17], "{rows:?}");
    // The pair's shared count starts again: two more failures at B, then it is blocked at A.
    for n in 0..2 {
        let wrong = As::basic("pusher", &format!("again-{n}"), Some(ATTACKER));
        assert_eq!(status(&b, &wrong).await, 401, "failure {n} after the success");
    }
    let resp = right.send(Method::GET, &a.server.v2(""), None).await;
    assert_throttled(resp, 5, "too many failed logins").await;
}

#[tokio::test]
async fn api_tokens_keep_working_while_password_failures_pile_up() {
    let s = Server::start("max_failed_logins = 2\nfailed_login_backoff_secs = 60\n");
    let secret = s.token_create("pusher", "ci/**:pull,push");
    // The attacker blocks both the user's password and the whole address: the user's name,
    // then enough other names to spend the address's allowance (three times the user's).
    assert_eq!(guess_until_throttled(&s, "pusher", ATTACKER).await, 2);
    for name in ["a", "b", "c", "d"] {
        let resp = As::basic(name, "wrong", Some(ATTACKER))
            .send(Method::GET, &s.server.v2(""), None)
            .await;
        assert_eq!(resp.status(), 401);
    }
    let resp = As::basic("nobody", "wrong", Some(ATTACKER))
        .send(Method::GET, &s.server.v2(""), None)
        .await;
    assert_throttled(resp, 60, "API tokens are not affected").await;

    // The API token works from that very address: Basic on every route and on /token.
    let token_user = As::basic("pusher", &secret, Some(ATTACKER));
    token_user.push_and_pull(&s, "ci/app", "v1").await;
    let resp = token_user.password_grant(&s, "repository:ci/app:pull,push").await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("token json");
    As::bearer(body["token"].as_str().expect("token"), Some(ATTACKER))
        .push_and_pull(&s, "ci/app", "v2")
        .await;
    // Wrong token secrets are not counted against the user or the address either.
    for n in 0..10 {
        let resp = As::basic("pusher", &format!("stw_not-a-real-token-{n}"), Some(ELSEWHERE))
            .send(Method::GET, &s.server.v2(""), None)
            .await;
        assert_eq!(resp.status(), 401);
        assert!(resp.text().await.unwrap_or_default().contains("API token"));
    }
    As::basic("pusher", "pusher-pw", Some(ELSEWHERE))
        .pull(&s, "ci/app", "v2")
        .await;
    // The password itself still waits at that address.
    let resp = As::basic("pusher", "pusher-pw", Some(ATTACKER))
        .send(Method::GET, &s.server.v2(""), None)
        .await;
    assert_throttled(resp, 60, "too many failed logins").await;
}

#[tokio::test]
async fn a_scoped_token_pulls_what_anonymous_clients_may() {
    let s = Server::start("");
    let admin = As::basic("admin", "admin-pw", None);
    admin.push_and_pull(&s, "public/app", "v1").await;
    admin.push_and_pull(&s, "private/app", "v1").await;
    admin.push_and_pull(&s, "private/other", "v1").await;
    let secret = s.token_create("pusher", "private/app:pull");
    let scoped = As::basic("pusher", &secret, None);

    // Anonymous clients may pull public/app; so may the token scoped to private/app.
    As {
        creds: Creds::None,
        from: None,
    }
    .pull(&s, "public/app", "v1")
    .await;
    scoped.pull(&s, "public/app", "v1").await;
    scoped.pull(&s, "private/app", "v1").await;
    // Nothing more: not another private repository, not a push to the public one.
    let resp = scoped
        .send(Method::GET, &s.server.v2("private/other/manifests/v1"), None)
        .await;
    assert_eq!(resp.status(), 403);
    let resp = scoped
        .send(Method::POST, &s.server.v2("public/app/blobs/uploads/"), None)
        .await;
    assert_eq!(resp.status(), 403);

    // The token endpoint grants it pull on the public repository, and the registry token works.
    let resp = scoped.password_grant(&s, "repository:public/app:pull,push").await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("token json");
    let jwt = body["token"].as_str().expect("token");
    let claims: serde_json::Value = {
        use base64::Engine as _;
        let payload = jwt.split('.').nth(1).expect("JWT payload");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64");
        serde_json::from_slice(&bytes).expect("claims")
    };
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "public/app", "actions": ["pull"]}])
    );
    As::bearer(jwt, None).pull(&s, "public/app", "v1").await;
    // A registry token for private/app only also pulls the public repository.
    let resp = scoped.password_grant(&s, "repository:private/app:pull").await;
    let body: serde_json::Value = resp.json().await.expect("token json");
    let jwt = body["token"].as_str().expect("token");
    As::bearer(jwt, None).pull(&s, "public/app", "v1").await;
    let resp = As::bearer(jwt, None)
        .send(Method::GET, &s.server.v2("private/other/manifests/v1"), None)
        .await;
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn an_expired_token_continues_an_upload_only_within_the_grace() {
    let s = Server::start("upload_token_grace_secs = 120\n");
    let push = vec![stowage::auth::jwt::AccessEntry::repository(
        "team/app",
        &[stowage::auth::Action::Pull, stowage::auth::Action::Push],
    )];
    let live = s.craft_token("pusher", push.clone(), 300);
    let lately = s.craft_token("pusher", push.clone(), -60);
    let long_ago = s.craft_token("pusher", push, -600);

    let resp = As::bearer(&live, None)
        .send(Method::POST, &s.server.v2("team/app/blobs/uploads/"), None)
        .await;
    assert_eq!(resp.status(), 202);
    let mut location = resp.headers()["location"].to_str().expect("location").to_owned();
    // A session is never started with an expired token, however recently it expired.
    let resp = As::bearer(&lately, None)
        .send(Method::POST, &s.server.v2("team/app/blobs/uploads/"), None)
        .await;
    assert_eq!(resp.status(), 401);

    let first = b"first chunk, ".to_vec();
    let second = b"second chunk".to_vec();
    // A token that expired ten minutes ago (beyond the grace) cannot continue it.
    let resp = As::bearer(&long_ago, None)
        .send(
            Method::PATCH,
            &format!("{}{location}", s.server.url),
            Some(first.clone()),
        )
        .await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii").to_owned();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    // One that expired a minute ago (within the grace) can, to the end.
    for chunk in [&first, &second] {
        let resp = As::bearer(&lately, None)
            .send(
                Method::PATCH,
                &format!("{}{location}", s.server.url),
                Some(chunk.clone()),
            )
            .await;
        assert_eq!(resp.status(), 202);
        location = resp.headers()["location"].to_str().expect("location").to_owned();
    }
    let data = [first, second].concat();
    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = As::bearer(&lately, None)
        .send(
            Method::PUT,
            &format!("{}{location}{sep}digest={}", s.server.url, sha256(&data)),
            None,
        )
        .await;
    assert_eq!(resp.status(), 201);
    // The grace is for uploads only: the same token cannot pull what it just pushed.
    let resp = As::bearer(&lately, None)
        .send(
            Method::GET,
            &s.server.v2(&format!("team/app/blobs/{}", sha256(&data))),
            None,
        )
        .await;
    assert_eq!(resp.status(), 401);
}
