//! The web UI (`src/ui`) against the real binary: in real headless Chromium (Debian's, driven by
//! `playwright-core` from `tests/ui/`: sign in, browse, open manifests, delete a tag, private
//! repositories hidden from anonymous viewers, Spack search and spec pages, then browsing with
//! JavaScript off; the admin pages in `tests/ui/admin.mjs`: a token created, used, revoked and
//! refused, a user added and removed; screenshots under `<target>/ui-screenshots/<backend>/`),
//! and over plain HTTP: the security headers, CSRF refusals, escaping, the sign-in limiter,
//! sign-out, policy, pagination, pages at 10,000 tags and 50,000 specs, the admin pages (refused to
//! non-admins, CSRF, a user's life cycle, escaping, audit pages, GC status), and the Spack
//! pages' facets, DAG drawing, dependents and escaping of spec values in the page and its SVG.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use common::sql::{CatalogSql, Param};
use common::{TestServer, client, run_cli, sha256};
use reqwest::StatusCode;

const CONFIG: &str = r#"
[auth]
enabled = true
anonymous_pull = ["public/**"]
max_failed_logins = 1000

[[auth.rules]]
repositories = ["**"]
users = ["alice"]
actions = ["pull", "push", "delete"]

[[auth.rules]]
repositories = ["public/**"]
users = ["bob"]
actions = ["pull"]
"#;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A server with authentication on and users `alice` (pull, push, delete everywhere), `bob`
/// (pull of `public/**`) and the admin `ops`, passwords `<name>-pw`.
struct UiServer {
    server: TestServer,
    _config: tempfile::TempDir,
}

impl UiServer {
    fn start(config: &str) -> UiServer {
        UiServer::start_env(config, &[])
    }

    /// [`UiServer::start`] with more environment variables.
    fn start_env(config: &str, env: &[(&str, &str)]) -> UiServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("stowage.toml");
        std::fs::write(&path, config).expect("write config");
        let mut envs = vec![
            ("STOWAGE_CONFIG", path.to_str().expect("utf-8 path")),
            ("STOWAGE_AUTH__ENABLED", "true"),
        ];
        envs.extend_from_slice(env);
        let server = TestServer::start_with(&envs);
        for name in ["alice", "bob"] {
            run_cli(server.data_dir(), &["user", "add", name], &format!("{name}-pw\n"));
        }
        run_cli(server.data_dir(), &["user", "add", "ops", "--admin"], "ops-pw\n");
        UiServer { server, _config: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url)
    }

    fn basic(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:alice-pw");
        format!("Basic {b64}")
    }

    async fn put_blob(&self, repo: &str, data: &[u8]) -> (String, usize) {
        let digest = sha256(data);
        let resp = client()
            .post(self.server.v2(&format!("{repo}/blobs/uploads/?digest={digest}")))
            .header("Authorization", self.basic())
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("POST blob");
        assert_eq!(resp.status(), 201, "blob upload to {repo}");
        (digest, data.len())
    }

    async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &serde_json::Value) -> String {
        let bytes = serde_json::to_vec(body).expect("json");
        let resp = client()
            .put(self.server.v2(&format!("{repo}/manifests/{reference}")))
            .header("Authorization", self.basic())
            .header("Content-Type", media_type)
            .body(bytes.clone())
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(resp.status(), 201, "manifest {repo}:{reference}");
        sha256(&bytes)
    }

    /// An image of `layers` layers with `annotations`, tagged `reference`; returns its digest.
    async fn image(&self, repo: &str, reference: &str, layers: usize, annotations: serde_json::Value) -> String {
        self.image_for(repo, reference, layers, annotations, "amd64").await
    }

    async fn image_for(
        &self,
        repo: &str,
        reference: &str,
        layers: usize,
        annotations: serde_json::Value,
        arch: &str,
    ) -> String {
        let config = format!(r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#);
        let (cd, cs) = self.put_blob(repo, config.as_bytes()).await;
        let mut descs = Vec::new();
        for i in 0..layers {
            let (d, s) = self
                .put_blob(repo, format!("layer {i} of {repo}:{reference} {arch}").as_bytes())
                .await;
            descs.push(
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}),
            );
        }
        let mut m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": descs,
        });
        if !annotations.is_null() {
            m["annotations"] = annotations;
        }
        self.put_manifest(repo, reference, MANIFEST, &m).await
    }

    /// An SBOM referrer of `subject` (an artifact of type `application/spdx+json`).
    async fn sbom(&self, repo: &str, subject: &str, annotations: serde_json::Value) -> String {
        let (ed, es) = self.put_blob(repo, b"{}").await;
        let (ld, ls) = self.put_blob(repo, br#"{"spdxVersion":"SPDX-2.3"}"#).await;
        let subject_size = self.manifest_size(repo, subject).await;
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "artifactType": "application/spdx+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": ed, "size": es},
            "layers": [{"mediaType": "application/spdx+json", "digest": ld, "size": ls}],
            "subject": {"mediaType": MANIFEST, "digest": subject, "size": subject_size},
            "annotations": annotations,
        });
        let digest = sha256(&serde_json::to_vec(&m).expect("json"));
        self.put_manifest(repo, &digest, MANIFEST, &m).await
    }

    /// The size of a stored manifest (HEAD).
    async fn manifest_size(&self, repo: &str, reference: &str) -> u64 {
        client()
            .head(self.server.v2(&format!("{repo}/manifests/{reference}")))
            .header("Authorization", self.basic())
            .send()
            .await
            .expect("HEAD manifest")
            .headers()["content-length"]
            .to_str()
            .expect("length")
            .parse()
            .expect("number")
    }

    /// The fixture the browser test browses.
    async fn fixture(&self) {
        let v1 = self
            .image(
                "public/app",
                "v1",
                2,
                serde_json::json!({"org.opencontainers.image.description": "The demo app", "org.opencontainers.image.version": "1.0"}),
            )
            .await;
        self.image("public/app", "v2", 1, serde_json::Value::Null).await;
        self.sbom(
            "public/app",
            &v1,
            serde_json::json!({"org.opencontainers.image.created": "2026-11-30T12:00:00Z"}),
        )
        .await;
        let amd = self
            .image_for("public/multi", "amd64", 1, serde_json::Value::Null, "amd64")
            .await;
        let arm = self
            .image_for("public/multi", "arm64", 1, serde_json::Value::Null, "arm64")
            .await;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": [
                {"mediaType": MANIFEST, "digest": amd, "size": self.manifest_size("public/multi", &amd).await, "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": MANIFEST, "digest": arm, "size": self.manifest_size("public/multi", &arm).await, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ],
        });
        self.put_manifest("public/multi", "latest", INDEX, &index).await;
        self.image("private/secret", "v1", 1, serde_json::Value::Null).await;
        self.spack_fixture("public/spack", &[]).await;
    }

    /// Pushes the Spack build cache fixture (real Spack's pushes) into `repo`, but for the spec
    /// tags that start with one of `skip`.
    async fn spack_fixture(&self, repo: &str, skip: &[&str]) {
        let fixture = common::spack::FixtureRepo::load("http-noauth", "spack_buildcache");
        for data in fixture.blobs.values() {
            self.put_blob(repo, data).await;
        }
        // Image manifests before the indexes that may list them.
        let mut order: Vec<_> = fixture
            .manifests
            .iter()
            .filter(|(t, _)| *t != "index.spack" && !skip.iter().any(|s| t.starts_with(s)))
            .collect();
        order.sort_by_key(|(_, (body, _))| body.windows(11).any(|w| w == b"\"manifests\""));
        for (tag, (body, ct)) in order {
            let json: serde_json::Value = serde_json::from_slice(body).expect("fixture manifest");
            let resp = client()
                .put(self.server.v2(&format!("{repo}/manifests/{tag}")))
                .header("Authorization", self.basic())
                .header("Content-Type", ct.as_str())
                .body(body.clone())
                .send()
                .await
                .expect("PUT manifest");
            assert_eq!(resp.status(), 201, "{tag}: {json}");
        }
    }

    /// Pushes into `repo` (which holds the Spack fixture) a copy of liba's spec image whose
    /// version and a variant carry HTML-special characters, under the hash `hash`; returns the
    /// version written.
    async fn spack_spec_with_markup(&self, repo: &str, hash: &str) -> String {
        let fixture = common::spack::FixtureRepo::load("http-noauth", "spack_buildcache");
        let (tag, (body, ct)) = fixture
            .manifests
            .iter()
            .find(|(t, _)| t.starts_with("liba-"))
            .expect("liba in the fixture");
        let mut manifest: serde_json::Value = serde_json::from_slice(body).expect("liba manifest");
        let config_digest = manifest["config"]["digest"].as_str().expect("config digest").to_owned();
        let mut config: serde_json::Value =
            serde_json::from_slice(&fixture.blobs[&config_digest]).expect("liba's config");
        let version = r#"1.0<b>&"x'"#.to_owned();
        let node = &mut config["spec"]["nodes"][0];
        node["version"] = serde_json::Value::String(version.clone());
        node["hash"] = serde_json::Value::String(hash.to_owned());
        node["parameters"]["cflags"] = serde_json::json!(["-O2 <script>alert(1)</script>"]);
        let bytes = serde_json::to_vec(&config).expect("config json");
        let (digest, size) = self.put_blob(repo, &bytes).await;
        manifest["config"]["digest"] = serde_json::Value::String(digest);
        manifest["config"]["size"] = serde_json::json!(size);
        let new_tag = tag
            .replace("3vaqv4q37uunzetmg437xpx7ssadj3dh", hash)
            .replace("-1.0-", "-markup-");
        self.put_manifest(repo, &new_tag, ct, &manifest).await;
        version
    }

    /// Tags of `repo` through the registry API (as alice).
    async fn api_tags(&self, repo: &str) -> Vec<String> {
        let resp = client()
            .get(self.server.v2(&format!("{repo}/tags/list")))
            .header("Authorization", self.basic())
            .send()
            .await
            .expect("tags list");
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.expect("json");
        body["tags"]
            .as_array()
            .expect("tags")
            .iter()
            .map(|t| t.as_str().expect("tag").to_owned())
            .collect()
    }
}

/// A browser's cookies and the last page's CSRF token, over reqwest (no JavaScript).
#[derive(Default)]
struct Browser {
    cookies: HashMap<String, String>,
}

impl Browser {
    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn absorb(&mut self, resp: &reqwest::Response) {
        for value in resp.headers().get_all("set-cookie") {
            let value = value.to_str().expect("cookie");
            let pair = value.split(';').next().expect("pair");
            let (k, v) = pair.split_once('=').expect("name=value");
            if v.is_empty() || value.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), v.to_owned());
            }
        }
    }

    async fn get(&mut self, url: &str) -> (StatusCode, String) {
        let resp = client()
            .get(url)
            .header("Cookie", self.cookie_header())
            .send()
            .await
            .expect("GET");
        self.absorb(&resp);
        let status = resp.status();
        (status, resp.text().await.expect("body"))
    }

    async fn post(&mut self, url: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let resp = client()
            .post(url)
            .header("Cookie", self.cookie_header())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("POST");
        self.absorb(&resp);
        resp
    }

    /// Signs in through the form; returns the response to the POST.
    async fn sign_in(&mut self, s: &UiServer, user: &str, password: &str) -> reqwest::Response {
        let (status, page) = self.get(&s.url("/ui/login")).await;
        assert_eq!(status, 200);
        let token = csrf(&page);
        self.post(
            &s.url("/ui/login"),
            &[("csrf", &token), ("username", user), ("password", password)],
        )
        .await
    }
}

fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The CSRF token of the first form on a page.
fn csrf(page: &str) -> String {
    let at = page.find(r#"name="csrf" value=""#).expect("a form with a CSRF token");
    let rest = &page[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').expect("end of value")].to_owned()
}

/// Where screenshots go: `<target dir>/ui-screenshots/`.
fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .join("ui-screenshots")
}

#[tokio::test]
async fn a_real_browser_signs_in_browses_and_deletes() {
    let s = UiServer::start(CONFIG);
    s.fixture().await;
    let ui_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    assert!(
        ui_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in tests/ui: run scripts/test (or `npm ci` there)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is not installed: run scripts/test (or `apt-get install chromium`)"
    );
    let shots = screenshot_dir().join(format!("{:?}", s.server.backend).to_lowercase());
    let script = ui_dir.clone();
    let url = s.server.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("browse.mjs")
            .current_dir(script)
            .env("STOWAGE_URL", url)
            .env("SCREENSHOT_DIR", &shots)
            .env("UI_USER", "alice")
            .env("UI_PASSWORD", "alice-pw")
            .output()
            .expect("run node")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "browser checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("browser checks passed"), "{stdout}");
    // What the browser deleted is gone from the registry API too; the rest stays.
    assert_eq!(s.api_tags("public/app").await, vec!["v1".to_owned()]);
    assert_eq!(s.api_tags("private/secret").await, vec!["v1".to_owned()]);
}

#[tokio::test]
async fn every_page_has_the_security_headers_and_assets_are_cached_by_hash() {
    let s = UiServer::start(CONFIG);
    s.image("public/app", "v1", 1, serde_json::Value::Null).await;
    let resp = client().get(s.url("/")).send().await.expect("GET /");
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/ui/");
    let mut b = Browser::default();
    for (path, status) in [
        ("/ui/", 200),
        ("/ui/login", 200),
        ("/ui/repos/public/app", 200),
        ("/ui/repos/nothing/here", 404),
        ("/ui/no-such-page", 404),
    ] {
        let resp = client()
            .get(s.url(path))
            .header("Cookie", b.cookie_header())
            .send()
            .await
            .expect("GET");
        b.absorb(&resp);
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let h = resp.headers();
        let csp = h["content-security-policy"].to_str().expect("csp");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp} lacks {directive}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "same-origin", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
        assert!(
            h["content-type"].to_str().expect("type").starts_with("text/html"),
            "{path}"
        );
        let body = resp.text().await.expect("body");
        // No inline script: every <script> has a src under /ui/assets/.
        for tag in body.split("<script").skip(1) {
            let head = &tag[..tag.find('>').expect("tag end")];
            assert!(head.contains(r#"src="/ui/assets/"#), "{path}: inline script {head}");
        }
        assert!(!body.contains(" style=\""), "{path}: inline style");
    }
    // The session cookie's attributes, from a real sign-in.
    let resp = b.sign_in(&s, "alice", "alice-pw").await;
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"].to_str().expect("cookie").to_owned();
    assert!(cookie.starts_with("stowage_session="), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: no Secure attribute: {cookie}");
    // Assets: content-hashed URLs, cached for a year, others 404.
    let (_, page) = b.get(&s.url("/ui/")).await;
    for name in ["style.css", "htmx.min.js", "ui.js"] {
        let at = page.find(&format!("/{name}\"")).expect("asset link");
        let start = page[..at].rfind("\"/ui/assets/").expect("asset url") + 1;
        let url = &page[start..at + name.len() + 1];
        let resp = client().get(s.url(url)).send().await.expect("asset");
        assert_eq!(resp.status(), 200, "{url}");
        assert_eq!(resp.headers()["cache-control"], "public, max-age=31536000, immutable");
        let stale = url.replace("/ui/assets/", "/ui/assets/0000");
        assert_eq!(client().get(s.url(&stale)).send().await.expect("asset").status(), 404);
    }
    let htmx = client()
        .get(s.url(&{
            let at = page.find("/htmx.min.js\"").expect("htmx");
            let start = page[..at].rfind("\"/ui/assets/").expect("url") + 1;
            page[start..at + "/htmx.min.js".len()].to_owned()
        }))
        .send()
        .await
        .expect("htmx")
        .bytes()
        .await
        .expect("bytes");
    let vendored = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web/vendor/htmx-2.0.11.min.js"))
        .expect("vendored htmx");
    assert_eq!(&htmx[..], &vendored[..], "the vendored htmx, byte for byte");
}

#[tokio::test]
async fn forms_without_their_csrf_token_are_refused() {
    let s = UiServer::start(CONFIG);
    s.image("public/app", "v1", 1, serde_json::Value::Null).await;
    s.image("public/app", "v2", 1, serde_json::Value::Null).await;
    let delete = s.url("/ui/repos/public/app/-/tags/v1/delete");

    // Sign-in without a token, with a token of another browser, with a made-up one.
    let mut b = Browser::default();
    b.get(&s.url("/ui/login")).await;
    let creds = [("username", "alice"), ("password", "alice-pw")];
    let resp = b.post(&s.url("/ui/login"), &creds).await;
    assert_eq!(resp.status(), 403, "sign-in without a CSRF token");
    let mut other = Browser::default();
    let (_, other_page) = other.get(&s.url("/ui/login")).await;
    let foreign = csrf(&other_page);
    let resp = b
        .post(&s.url("/ui/login"), &[("csrf", &foreign), creds[0], creds[1]])
        .await;
    assert_eq!(resp.status(), 403, "sign-in with another browser's token");
    let body = resp.text().await.expect("body");
    assert!(body.contains("CSRF"), "the page says why: {body}");
    assert!(!b.cookies.contains_key("stowage_session"));

    // Signed in: deletes without the session's token are refused, and nothing is deleted.
    assert_eq!(b.sign_in(&s, "alice", "alice-pw").await.status(), 303);
    assert!(b.cookies.contains_key("stowage_session"));
    assert_eq!(b.post(&delete, &[]).await.status(), 403, "no token");
    assert_eq!(b.post(&delete, &[("csrf", "")]).await.status(), 403, "empty token");
    assert_eq!(
        b.post(&delete, &[("csrf", &foreign)]).await.status(),
        403,
        "another browser's token"
    );
    // A token from before sign-in (bound to the pre-session cookie) is not the session's.
    let mut alice2 = Browser::default();
    alice2.sign_in(&s, "alice", "alice-pw").await;
    let (_, page2) = alice2.get(&s.url("/ui/repos/public/app")).await;
    let token2 = csrf(&page2);
    assert_eq!(
        b.post(&delete, &[("csrf", &token2)]).await.status(),
        403,
        "another session's token"
    );
    assert_eq!(s.api_tags("public/app").await, vec!["v1", "v2"], "nothing deleted");
    // A cross-site post carries no cookie at all (SameSite=Strict): refused as well.
    let resp = client()
        .post(&delete)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={token2}"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 403);

    // With its own token, the delete goes through.
    let (_, page) = b.get(&s.url("/ui/repos/public/app")).await;
    let token = csrf(&page);
    let resp = b.post(&delete, &[("csrf", &token)]).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/ui/repos/public/app?deleted=v1");
    assert_eq!(s.api_tags("public/app").await, vec!["v2"]);

    // Sign-out needs the token too; after it the old cookie is worth nothing.
    assert_eq!(b.post(&s.url("/ui/logout"), &[]).await.status(), 403);
    let old = b.cookie_header();
    let resp = b.post(&s.url("/ui/logout"), &[("csrf", &token)]).await;
    assert_eq!(resp.status(), 303);
    let resp = client()
        .get(s.url("/ui/repos/private/secret"))
        .header("Cookie", &old)
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 404, "the signed-out session sees no private repository");
    let resp = client()
        .post(s.url("/ui/repos/public/app/-/tags/v2/delete"))
        .header("Cookie", &old)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={token}"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 403, "the signed-out session's token is dead");
    assert_eq!(s.api_tags("public/app").await, vec!["v2"]);
}

#[tokio::test]
async fn html_special_characters_are_escaped() {
    let s = UiServer::start(CONFIG);
    let evil = r#"<script>alert("x")</script> & 'quotes'"#;
    let digest = s
        .image(
            "public/app",
            "v1",
            1,
            serde_json::json!({ "org.example.note": evil, "org.example.<b>key</b>": "v" }),
        )
        .await;
    s.sbom("public/app", &digest, serde_json::json!({ "org.example.sbom": evil }))
        .await;
    let mut b = Browser::default();
    let (status, page) = b
        .get(&s.url(&format!("/ui/repos/public/app/-/manifests/{digest}")))
        .await;
    assert_eq!(status, 200);
    assert!(!page.contains("<script>alert"), "unescaped annotation:\n{page}");
    assert!(!page.contains("<b>key</b>"), "unescaped annotation key");
    let escaped = "&#60;script&#62;alert(&#34;x&#34;)&#60;/script&#62; &#38; &#39;quotes&#39;";
    assert_eq!(
        page.matches(escaped).count(),
        2,
        "the annotation is shown escaped, on the manifest and on its referrer:\n{page}"
    );
    assert!(page.contains("org.example.&#60;b&#62;key&#60;/b&#62;"));
    // The filter is echoed into the page (the search box, "no match" line), escaped.
    let (status, page) = b
        .get(&s.url("/ui/?q=%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E"))
        .await;
    assert_eq!(status, 200);
    assert!(!page.contains("<img src=x"), "unescaped filter:\n{page}");
    assert!(
        page.contains("&#34;&#62;&#60;img src=x onerror=alert(1)&#62;"),
        "{page}"
    );
}

#[tokio::test]
async fn sign_in_is_rate_limited_like_the_token_endpoint() {
    let config = CONFIG.replace(
        "max_failed_logins = 1000",
        "max_failed_logins = 2\nfailed_login_backoff_secs = 60",
    );
    let s = UiServer::start(&config);
    let mut b = Browser::default();
    for attempt in 0..2 {
        let resp = b.sign_in(&s, "alice", "wrong").await;
        assert_eq!(resp.status(), 401, "attempt {attempt}");
        let page = resp.text().await.expect("body");
        assert!(page.contains("Wrong user name or password"), "{page}");
    }
    // Blocked now: even the right password is refused before it is checked.
    let resp = b.sign_in(&s, "alice", "alice-pw").await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(!b.cookies.contains_key("stowage_session"));
    // The same limiter as /token: alice is refused there too from this address.
    let resp = client()
        .get(s.url("/token?service=stowage"))
        .header("Authorization", s.basic())
        .send()
        .await
        .expect("token");
    assert_eq!(resp.status(), 429, "/token shares the limiter");
    // Another user from the same address is not blocked by alice's failures.
    assert_eq!(b.sign_in(&s, "bob", "bob-pw").await.status(), 303);
}

#[tokio::test]
async fn pages_show_only_what_the_viewer_may_pull_and_delete() {
    let s = UiServer::start(CONFIG);
    s.image("public/app", "v1", 1, serde_json::Value::Null).await;
    let secret = s.image("private/secret", "v1", 1, serde_json::Value::Null).await;
    let secret_page = s.url(&format!("/ui/repos/private/secret/-/manifests/{secret}"));

    let mut anon = Browser::default();
    let (_, page) = anon.get(&s.url("/ui/")).await;
    assert!(page.contains("public/app") && !page.contains("private/secret"));
    for url in [s.url("/ui/repos/private/secret"), secret_page.clone()] {
        let (status, page) = anon.get(&url).await;
        assert_eq!(status, 404, "{url}");
        assert!(!page.contains(&secret), "the 404 page reveals nothing");
    }
    let (_, page) = anon.get(&s.url("/ui/repos/public/app")).await;
    assert!(!page.contains("data-delete="), "no delete button for anonymous");

    // bob may pull public/** only, and delete nothing.
    let mut bob = Browser::default();
    assert_eq!(bob.sign_in(&s, "bob", "bob-pw").await.status(), 303);
    let (_, page) = bob.get(&s.url("/ui/")).await;
    assert!(page.contains("Signed in as") && page.contains("bob"));
    assert!(!page.contains("private/secret"));
    assert_eq!(bob.get(&secret_page).await.0, 404);
    let (_, page) = bob.get(&s.url("/ui/repos/public/app")).await;
    assert!(!page.contains("data-delete="), "no delete button for bob");
    let token = csrf(&page);
    let resp = bob
        .post(&s.url("/ui/repos/public/app/-/tags/v1/delete"), &[("csrf", &token)])
        .await;
    assert_eq!(resp.status(), 403, "bob may not delete");
    let body = resp.text().await.expect("body");
    assert!(
        body.contains("user bob may not delete on repository public/app"),
        "{body}"
    );
    assert_eq!(s.api_tags("public/app").await, vec!["v1"]);

    // alice sees and may delete everything.
    let mut alice = Browser::default();
    alice.sign_in(&s, "alice", "alice-pw").await;
    let (_, page) = alice.get(&s.url("/ui/")).await;
    assert!(page.contains("private/secret"));
    let (status, page) = alice.get(&secret_page).await;
    assert_eq!(status, 200);
    assert!(page.contains(&secret));
    let (_, page) = alice.get(&s.url("/ui/repos/public/app")).await;
    assert!(page.contains(r#"data-delete="v1""#));

    // Removing a user ends their sessions at once.
    run_cli(s.server.data_dir(), &["user", "remove", "alice"], "");
    let (status, page) = alice.get(&secret_page).await;
    assert_eq!(status, 404);
    assert!(!page.contains("Signed in as"));
}

#[tokio::test]
async fn listings_are_paginated_and_filtered() {
    let s = UiServer::start(CONFIG);
    for tag in ["a1", "a2", "b1", "b2", "b3"] {
        s.image("public/app", tag, 1, serde_json::Value::Null).await;
    }
    for repo in ["public/r1", "public/r2", "public/x3"] {
        s.image(repo, "v1", 1, serde_json::Value::Null).await;
    }
    let mut b = Browser::default();
    let tags_of = |page: &str| -> Vec<String> {
        page.split(r#"class="tag" href=""#)
            .skip(1)
            .map(|rest| {
                let text = &rest[rest.find('>').expect(">") + 1..];
                text[..text.find('<').expect("<")].to_owned()
            })
            .collect()
    };
    let next_of = |page: &str| -> Option<String> {
        let at = page.find(r#"rel="next" href=""#)?;
        let rest = &page[at + r#"rel="next" href=""#.len()..];
        Some(rest[..rest.find('"').expect("end")].replace("&#38;", "&"))
    };
    let (_, page) = b.get(&s.url("/ui/repos/public/app?n=2")).await;
    assert_eq!(tags_of(&page), ["a1", "a2"]);
    let next = next_of(&page).expect("a next page");
    assert_eq!(next, "/ui/repos/public/app?after=a2&n=2");
    let (_, page) = b.get(&s.url(&next)).await;
    assert_eq!(tags_of(&page), ["b1", "b2"]);
    let (_, page) = b.get(&s.url(&next_of(&page).expect("third page"))).await;
    assert_eq!(tags_of(&page), ["b3"]);
    assert!(next_of(&page).is_none(), "the last page has no next link");
    // Filtered and paginated together.
    let (_, page) = b.get(&s.url("/ui/repos/public/app?q=b&n=2")).await;
    assert_eq!(tags_of(&page), ["b1", "b2"]);
    let next = next_of(&page).expect("next");
    assert_eq!(next, "/ui/repos/public/app?after=b2&q=b&n=2");
    let (_, page) = b.get(&s.url(&next)).await;
    assert_eq!(tags_of(&page), ["b3"]);
    // Repositories: filter by name; counts and sizes shown.
    let (_, page) = b.get(&s.url("/ui/?q=public/r")).await;
    assert!(page.contains("public/r1") && page.contains("public/r2") && !page.contains("public/x3"));
    let (_, page) = b.get(&s.url("/ui/?n=1")).await;
    assert!(page.contains(">public/app<") && !page.contains(">public/r1<"));
    assert_eq!(next_of(&page).as_deref(), Some("/ui/?after=public%2Fapp&n=1"));
    // Bad parameters get a 400 page, never a 500.
    assert_eq!(b.get(&s.url("/ui/?n=abc")).await.0, 400);
    assert_eq!(b.get(&s.url(&format!("/ui/?q={}", "x".repeat(300)))).await.0, 400);
    assert_eq!(
        b.get(&s.url("/ui/repos/public/app/-/manifests/sha256:nothex")).await.0,
        404
    );
    assert_eq!(b.get(&s.url("/ui/repos/Bad..Name")).await.0, 404);
}

#[tokio::test]
async fn the_ui_can_be_turned_off() {
    let server = TestServer::start_with(&[("STOWAGE_UI__ENABLED", "false")]);
    for path in ["/", "/ui/", "/ui/login"] {
        let resp = client().get(format!("{}{path}", server.url)).send().await.expect("GET");
        assert_eq!(resp.status(), 404, "{path}");
    }
    // The registry itself is unaffected.
    assert_eq!(
        client().get(server.v2("")).send().await.expect("GET /v2/").status(),
        200
    );
}

/// Tags in the scale test: the issue's 10,000.
const SCALE_TAGS: usize = 10_000;

#[tokio::test]
async fn pages_show_what_they_should_at_ten_thousand_tags() {
    let s = UiServer::start(CONFIG);
    let digest = s.image("public/big", "seed", 2, serde_json::Value::Null).await;
    let manifest = client()
        .get(s.server.v2(&format!("public/big/manifests/{digest}")))
        .header("Authorization", s.basic())
        .header("Accept", MANIFEST)
        .send()
        .await
        .expect("GET manifest")
        .bytes()
        .await
        .expect("bytes");
    // The same manifest under 10,000 tags, 16 PUTs at a time.
    let started = std::time::Instant::now();
    let auth = s.basic();
    let mut tasks = tokio::task::JoinSet::new();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..16 {
        let (next, auth, manifest) = (next.clone(), auth.clone(), manifest.clone());
        let url = s.server.v2("public/big/manifests/");
        tasks.spawn(async move {
            let c = client();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= SCALE_TAGS {
                    break;
                }
                let resp = c
                    .put(format!("{url}tag-{i:05}"))
                    .header("Authorization", &auth)
                    .header("Content-Type", MANIFEST)
                    .body(manifest.clone())
                    .send()
                    .await
                    .expect("PUT");
                assert_eq!(resp.status(), 201);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("pusher");
    }
    println!("tagged {SCALE_TAGS} in {:.1} s", started.elapsed().as_secs_f64());

    let b = Browser::default();
    let time = |path: &'static str| {
        let url = s.url(path);
        let cookie = b.cookie_header();
        async move {
            // The median of five, after one warm-up request.
            let mut ms = Vec::new();
            for i in 0..6 {
                let t = std::time::Instant::now();
                let resp = client().get(&url).header("Cookie", &cookie).send().await.expect("GET");
                assert_eq!(resp.status(), 200, "{path}");
                let body = resp.text().await.expect("body");
                if i > 0 {
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                assert!(body.contains("public/big"), "{path}");
            }
            ms.sort_by(f64::total_cmp);
            (path, ms[ms.len() / 2])
        }
    };
    let mut worst = 0.0f64;
    for (path, median) in [
        time("/ui/").await,
        time("/ui/repos/public/big").await,
        time("/ui/repos/public/big?after=tag-09000&n=500").await,
        time("/ui/repos/public/big?q=tag-0999").await,
        time("/ui/repos/public/big?q=no-such-tag").await,
    ] {
        println!("{path}: median {median:.1} ms");
        worst = worst.max(median);
    }
    // Speed is the UI benchmark's to measure (`cargo bench --bench ui`, release build, p99 of
    // 200 GETs per page); this test holds what each page shows at scale, and prints its times.
    println!("slowest page (median): {worst:.0} ms");
}

#[tokio::test]
async fn spack_pages_search_specs_and_show_what_is_missing() {
    let s = UiServer::start(CONFIG);
    // Everything but gcc-runtime: liba and libb depend on it, so it is missing for them.
    s.spack_fixture("public/spack", &["gcc-runtime-"]).await;
    s.image("public/app", "v1", 1, serde_json::Value::Null).await;
    let mut b = Browser::default();
    let (_, page) = b.get(&s.url("/ui/repos/public/spack")).await;
    assert!(
        page.contains(r#"id="spack-link""#),
        "the repository page links its Spack search"
    );
    let (_, page) = b.get(&s.url("/ui/repos/public/app")).await;
    assert!(!page.contains(r#"id="spack-link""#), "not for a plain image repository");

    let specs_of = |page: &str| -> Vec<String> {
        page.split(r#"class="spec" href=""#)
            .skip(1)
            .map(|rest| {
                let text = &rest[rest.find('>').expect(">") + 1..];
                text[..text.find('<').expect("<")].to_owned()
            })
            .collect()
    };
    let (status, page) = b.get(&s.url("/ui/repos/public/spack/-/spack")).await;
    assert_eq!(status, 200);
    assert_eq!(specs_of(&page), ["appc", "compiler-wrapper", "liba", "libb"]);
    assert!(page.contains(&format!("spack mirror add spack oci://{}/public/spack", s.server.host)));
    let (_, page) = b
        .get(&s.url("/ui/repos/public/spack/-/spack?name=libb&version=2.1"))
        .await;
    assert_eq!(specs_of(&page), ["libb"]);
    let (_, page) = b
        .get(&s.url("/ui/repos/public/spack/-/spack?name=libb&version=9"))
        .await;
    assert!(specs_of(&page).is_empty() && page.contains("No spec named"));

    // liba's spec page: its DAG, gcc-runtime missing, the install line.
    let hash = "3vaqv4q37uunzetmg437xpx7ssadj3dh";
    let (status, page) = b.get(&s.url(&format!("/ui/repos/public/spack/-/spack/{hash}"))).await;
    assert_eq!(status, 200);
    assert!(page.contains("liba@1.0"));
    assert!(page.contains(&format!("spack install --cache-only liba@1.0/{hash}")));
    let table = &page[page.find(r#"id="dependencies""#).expect("the dependency table")..];
    let row = |name: &str| -> String {
        let at = table
            .find(&format!("{name}@"))
            .map(|at| at + (page.len() - table.len()))
            .unwrap_or_else(|| panic!("{name} in the DAG:\n{page}"));
        let start = page[..at].rfind("<tr").expect("row start");
        page[start..start + page[start..].find("</tr>").expect("row end")].to_owned()
    };
    assert!(
        row("gcc-runtime").contains("<strong>missing</strong>"),
        "{}",
        row("gcc-runtime")
    );
    assert!(row("gcc-runtime").contains("direct: link"), "{}", row("gcc-runtime"));
    assert!(
        row("compiler-wrapper").contains(r#"class="cached""#),
        "{}",
        row("compiler-wrapper")
    );
    assert!(page.contains("<strong>1 missing</strong>"), "{page}");
    // Unknown or malformed hashes, bad fields: 404 and 400 pages.
    assert_eq!(b.get(&s.url("/ui/repos/public/spack/-/spack/aaaaaaaa")).await.0, 404);
    assert_eq!(b.get(&s.url("/ui/repos/public/spack/-/spack/NOT-A-HASH")).await.0, 404);
    assert_eq!(
        b.get(&s.url("/ui/repos/public/spack/-/spack?name=%3Cb%3E")).await.0,
        400
    );
    assert_eq!(
        b.get(&s.url("/ui/repos/public/app/-/spack")).await.0,
        404,
        "not a build cache"
    );
}

#[tokio::test]
async fn cookies_are_secure_when_the_browser_came_over_https() {
    // Behind a trusted proxy that terminated TLS (X-Forwarded-Proto: https).
    let config = CONFIG.replace(
        "max_failed_logins = 1000",
        "max_failed_logins = 1000\ntrusted_proxies = [\"127.0.0.1\"]",
    );
    let s = UiServer::start(&config);
    let get = |proto: &'static str| {
        client()
            .get(s.url("/ui/login"))
            .header("X-Forwarded-Proto", proto)
            .send()
    };
    let plain = get("http").await.expect("GET");
    assert!(
        !plain.headers()["set-cookie"]
            .to_str()
            .expect("cookie")
            .contains("Secure")
    );
    let resp = get("https").await.expect("GET");
    let pre = resp.headers()["set-cookie"].to_str().expect("cookie").to_owned();
    assert!(pre.ends_with("; Secure"), "{pre}");
    let pre = pre.split(';').next().expect("pair").to_owned();
    let token = csrf(&resp.text().await.expect("body"));
    let resp = client()
        .post(s.url("/ui/login"))
        .header("X-Forwarded-Proto", "https")
        .header("Cookie", &pre)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("csrf={token}&username=alice&password=alice-pw"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 303);
    let session = resp.headers()["set-cookie"].to_str().expect("cookie");
    assert!(
        session.starts_with("stowage_session=") && session.contains("HttpOnly") && session.ends_with("; Secure"),
        "{session}"
    );
}

#[tokio::test]
async fn the_audit_trail_records_ui_deletes_refusals_and_failed_sign_ins() {
    let s = UiServer::start(CONFIG);
    s.image("public/app", "v1", 1, serde_json::Value::Null).await;
    s.image("public/app", "v2", 1, serde_json::Value::Null).await;
    let mut alice = Browser::default();
    assert_eq!(alice.sign_in(&s, "alice", "alice-pw").await.status(), 303);
    let (_, page) = alice.get(&s.url("/ui/repos/public/app")).await;
    let token = csrf(&page);
    let resp = alice
        .post(&s.url("/ui/repos/public/app/-/tags/v1/delete"), &[("csrf", &token)])
        .await;
    assert_eq!(resp.status(), 303);
    let mut bob = Browser::default();
    bob.sign_in(&s, "bob", "bob-pw").await;
    let (_, page) = bob.get(&s.url("/ui/repos/public/app")).await;
    let token = csrf(&page);
    let resp = bob
        .post(&s.url("/ui/repos/public/app/-/tags/v2/delete"), &[("csrf", &token)])
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(Browser::default().sign_in(&s, "alice", "nope").await.status(), 401);

    let ops = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("ops:ops-pw")
    );
    let entries = || async {
        let resp = client()
            .get(s.url("/stowage/v1/audit?limit=100"))
            .header("Authorization", &ops)
            .send()
            .await
            .expect("audit");
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.expect("json");
        body["entries"].as_array().expect("entries").clone()
    };
    let find = |entries: &[serde_json::Value], action: &str, actor: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action && e["actor"] == actor)
            .cloned()
    };
    common::wait_until("the refusals are in the audit trail", || async {
        let e = entries().await;
        find(&e, "denied.delete", "bob").is_some() && find(&e, "login.failed", "alice").is_some()
    })
    .await;
    let e = entries().await;
    let deleted = find(&e, "tag.delete", "alice").expect("alice's delete through the UI is recorded");
    assert_eq!(deleted["repository"], "public/app");
    assert_eq!(deleted["tag"], "v1");
    assert_eq!(deleted["client"], "127.0.0.1");
    assert!(
        deleted["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{deleted}"
    );
    let denied = find(&e, "denied.delete", "bob").expect("bob's refused delete");
    assert_eq!(denied["repository"], "public/app");
}

// ---- Admin pages -----------------------------------------------------------------------------

/// Every admin page, and every admin form with a field set that would change something.
const ADMIN_PAGES: &[&str] = &[
    "/ui/admin/users",
    "/ui/admin/users/alice",
    "/ui/admin/users/alice/remove",
    "/ui/admin/tokens",
    "/ui/admin/audit",
    "/ui/admin/gc",
];

fn admin_forms() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    vec![
        (
            "/ui/admin/users",
            vec![
                ("name", "mallory"),
                ("password", "m-pw"),
                ("again", "m-pw"),
                ("admin", "true"),
            ],
        ),
        (
            "/ui/admin/users/alice/password",
            vec![("password", "new-pw"), ("again", "new-pw")],
        ),
        ("/ui/admin/users/bob/admin", vec![("admin", "true")]),
        ("/ui/admin/users/ops/admin", vec![("admin", "false")]),
        ("/ui/admin/users/alice/remove", vec![]),
        (
            "/ui/admin/tokens",
            vec![
                ("user", "bob"),
                ("name", "evil"),
                ("scopes", "**:*"),
                ("expires_in_days", ""),
            ],
        ),
        ("/ui/admin/tokens/1/revoke", vec![]),
    ]
}

/// Users and tokens as the command line lists them (to see that nothing changed).
fn accounts_state(s: &UiServer) -> (String, String) {
    let users = run_cli(s.server.data_dir(), &["user", "list"], "");
    let tokens = run_cli(s.server.data_dir(), &["token", "list"], "");
    assert!(users.status.success() && tokens.status.success());
    (
        String::from_utf8_lossy(&users.stdout).into_owned(),
        String::from_utf8_lossy(&tokens.stdout).into_owned(),
    )
}

/// `GET /v2/` with HTTP Basic credentials.
async fn v2_status(s: &UiServer, user: &str, password: &str) -> u16 {
    client()
        .get(s.server.v2(""))
        .basic_auth(user, Some(password))
        .send()
        .await
        .expect("GET /v2/")
        .status()
        .as_u16()
}

/// The secret on the page answering a token's creation.
fn secret_on(page: &str) -> String {
    let at = page.find(r#"id="token-secret">"#).expect("the secret is shown") + r#"id="token-secret">"#.len();
    page[at..at + page[at..].find('<').expect("end")].to_owned()
}

/// Signs in as `user` and returns the browser; asserts it worked.
async fn signed_in(s: &UiServer, user: &str, password: &str) -> Browser {
    let mut b = Browser::default();
    assert_eq!(b.sign_in(s, user, password).await.status(), 303, "{user} signs in");
    b
}

/// Posts an admin form with the browser's own valid CSRF token.
async fn admin_post(b: &mut Browser, s: &UiServer, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
    let (_, mut page) = b.get(&s.url("/ui/")).await;
    if !page.contains(r#"name="csrf""#) {
        // Anonymous: the sign-in form's token, bound to this browser's pre-session cookie.
        page = b.get(&s.url("/ui/login")).await.1;
    }
    let token = csrf(&page);
    let mut fields = vec![("csrf", token.as_str())];
    fields.extend_from_slice(form);
    b.post(&s.url(path), &fields).await
}

#[tokio::test]
async fn a_real_browser_manages_users_and_tokens() {
    let s = UiServer::start(CONFIG);
    s.image("private/secret", "v1", 1, serde_json::Value::Null).await;
    let ui_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    assert!(
        ui_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in tests/ui: run scripts/test (or `npm ci` there)"
    );
    let shots = screenshot_dir().join(format!("{:?}", s.server.backend).to_lowercase());
    let url = s.server.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("admin.mjs")
            .current_dir(ui_dir)
            .env("STOWAGE_URL", url)
            .env("SCREENSHOT_DIR", &shots)
            .env("ADMIN_USER", "ops")
            .env("ADMIN_PASSWORD", "ops-pw")
            .output()
            .expect("run node")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "browser checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("admin browser checks passed"), "{stdout}");
    // What the browser did, as the command line sees it.
    let (users, tokens) = accounts_state(&s);
    assert!(!users.contains("carol"), "carol was removed:\n{users}");
    let line = tokens
        .lines()
        .find(|l| l.contains("ci <b>"))
        .expect("the token is listed");
    assert!(line.contains("revoked"), "{line}");
}

#[tokio::test]
async fn admin_pages_are_refused_to_everyone_but_admins() {
    let s = UiServer::start(CONFIG);
    let before = accounts_state(&s);
    let mut anonymous = Browser::default();
    let mut bob = signed_in(&s, "bob", "bob-pw").await;
    let mut ops = signed_in(&s, "ops", "ops-pw").await;
    for (who, b) in [("anonymous", &mut anonymous), ("bob", &mut bob)] {
        let (status, page) = b.get(&s.url("/ui/")).await;
        assert_eq!(status, 200);
        assert!(!page.contains("admin-link"), "{who} sees no Admin link");
        for path in ADMIN_PAGES {
            let (status, page) = b.get(&s.url(path)).await;
            assert_eq!(status, 403, "{who} GET {path}");
            assert!(
                page.contains("admin pages"),
                "{who} GET {path}: the page says why:\n{page}"
            );
            assert!(
                !page.contains("alice-pw") && !page.contains("<table"),
                "{who} GET {path}"
            );
        }
        // `/ui/admin` leads to the users page, refused as well.
        let resp = client().get(s.url("/ui/admin")).send().await.expect("GET");
        assert_eq!(resp.status(), 303);
        for (path, form) in admin_forms() {
            // With a valid CSRF token of their own: refused for the role.
            let resp = admin_post(b, &s, path, &form).await;
            assert_eq!(resp.status(), 403, "{who} POST {path}");
            let body = resp.text().await.expect("body");
            assert!(
                body.contains("admin pages") && !body.contains("CSRF"),
                "{who} POST {path}: {body}"
            );
        }
    }
    assert_eq!(accounts_state(&s), before, "nothing changed");
    // The admin sees the link and the pages.
    let (_, page) = ops.get(&s.url("/ui/")).await;
    assert!(page.contains(r#"id="admin-link""#));
    for path in ADMIN_PAGES {
        assert_eq!(ops.get(&s.url(path)).await.0, 200, "ops GET {path}");
    }
    // The pages take a session, never HTTP Basic credentials (even an admin's).
    let resp = client()
        .get(s.url("/ui/admin/users"))
        .basic_auth("ops", Some("ops-pw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 403, "Basic credentials do not open the admin pages");
}

#[tokio::test]
async fn admin_forms_without_their_csrf_token_are_refused_and_change_nothing() {
    let s = UiServer::start(CONFIG);
    run_cli(
        s.server.data_dir(),
        &[
            "token", "create", "--user", "alice", "--name", "t", "--scope", "**:pull",
        ],
        "",
    );
    let before = accounts_state(&s);
    let mut ops = signed_in(&s, "ops", "ops-pw").await;
    let mut other = signed_in(&s, "ops", "ops-pw").await;
    let (_, other_page) = other.get(&s.url("/ui/admin/users")).await;
    let foreign = csrf(&other_page);
    for (path, form) in admin_forms() {
        let resp = ops.post(&s.url(path), &form).await;
        assert_eq!(resp.status(), 403, "POST {path} without a token");
        assert!(resp.text().await.expect("body").contains("CSRF"), "{path}");
        let mut with_foreign = vec![("csrf", foreign.as_str())];
        with_foreign.extend_from_slice(&form);
        assert_eq!(
            ops.post(&s.url(path), &with_foreign).await.status(),
            403,
            "POST {path} with another session's token"
        );
        let mut empty = vec![("csrf", "")];
        empty.extend_from_slice(&form);
        assert_eq!(
            ops.post(&s.url(path), &empty).await.status(),
            403,
            "POST {path} with an empty token"
        );
    }
    assert_eq!(accounts_state(&s), before, "nothing changed");
    // With the token, the same form works (the refusals above were for the token alone).
    let resp = admin_post(&mut ops, &s, "/ui/admin/users/bob/admin", &[("admin", "true")]).await;
    assert_eq!(resp.status(), 303);
    assert_ne!(accounts_state(&s), before);
}

#[tokio::test]
async fn admins_add_reset_promote_and_remove_users() {
    let s = UiServer::start(CONFIG);
    let mut ops = signed_in(&s, "ops", "ops-pw").await;

    // Add carol; bad input is refused with a page saying why.
    let add = |name: &'static str, pw: &'static str, again: &'static str| {
        vec![("name", name), ("password", pw), ("again", again)]
    };
    let resp = admin_post(&mut ops, &s, "/ui/admin/users", &add("carol", "c1", "c2")).await;
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.expect("body").contains("The passwords differ"));
    let resp = admin_post(&mut ops, &s, "/ui/admin/users", &add("<b>carol</b>", "c1", "c1")).await;
    assert_eq!(resp.status(), 400, "a name with markup is refused");
    let resp = admin_post(&mut ops, &s, "/ui/admin/users", &add("carol", "stw_x", "stw_x")).await;
    assert_eq!(resp.status(), 400, "a password shaped like a token secret");
    let resp = admin_post(&mut ops, &s, "/ui/admin/users", &add("carol", "c1", "c1")).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/ui/admin/users?done=added&name=carol");
    let resp = admin_post(&mut ops, &s, "/ui/admin/users", &add("carol", "c1", "c1")).await;
    assert_eq!(resp.status(), 409, "the name is taken");
    let (_, page) = ops.get(&s.url("/ui/admin/users?done=added&name=carol")).await;
    assert!(page.contains("Added user carol."));
    assert!(page.contains(r#"data-user="carol""#));

    // Carol signs in; she is no admin. A token of hers works.
    let mut carol = signed_in(&s, "carol", "c1").await;
    let (_, page) = carol.get(&s.url("/ui/")).await;
    assert!(page.contains(r#"id="signed-in-user">carol<"#) && !page.contains("admin-link"));
    assert_eq!(carol.get(&s.url("/ui/admin/users")).await.0, 403);
    let resp = admin_post(
        &mut ops,
        &s,
        "/ui/admin/tokens",
        &[
            ("user", "carol"),
            ("name", "laptop"),
            ("scopes", "public/**:pull"),
            ("expires_in_days", "7"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let secret = secret_on(&resp.text().await.expect("body"));
    assert_eq!(v2_status(&s, "carol", &secret).await, 200, "carol's token works");
    assert_eq!(v2_status(&s, "carol", "c1").await, 200);

    // Reset her password: her session ends, the old password is refused, the new one works.
    let resp = admin_post(
        &mut ops,
        &s,
        "/ui/admin/users/carol/password",
        &[("password", "c2"), ("again", "c2")],
    )
    .await;
    assert_eq!(resp.status(), 303);
    let (_, page) = carol.get(&s.url("/ui/")).await;
    assert!(
        !page.contains("signed-in-user"),
        "carol's session ended with the old password"
    );
    assert_eq!(v2_status(&s, "carol", "c1").await, 401, "the old password is refused");
    assert_eq!(v2_status(&s, "carol", "c2").await, 200, "the new password works");
    assert_eq!(carol.sign_in(&s, "carol", "c1").await.status(), 401);
    assert_eq!(carol.sign_in(&s, "carol", "c2").await.status(), 303);

    // Make her an admin: she sees the Admin link and the pages.
    let resp = admin_post(&mut ops, &s, "/ui/admin/users/carol/admin", &[("admin", "true")]).await;
    assert_eq!(resp.status(), 303);
    let (_, page) = carol.get(&s.url("/ui/")).await;
    assert!(page.contains(r#"id="admin-link""#), "carol sees Admin");
    assert_eq!(carol.get(&s.url("/ui/admin/users")).await.0, 200);

    // Nobody removes or demotes themself.
    for (path, form) in [
        ("/ui/admin/users/ops/admin", vec![("admin", "false")]),
        ("/ui/admin/users/ops/remove", vec![]),
    ] {
        let resp = admin_post(&mut ops, &s, path, &form).await;
        assert_eq!(resp.status(), 403, "{path}");
        let body = resp.text().await.expect("body");
        assert!(body.contains("You cannot"), "{body}");
    }
    assert!(
        accounts_state(&s)
            .0
            .lines()
            .any(|l| l.starts_with("ops ") && l.contains("yes"))
    );
    let resp = admin_post(&mut ops, &s, "/ui/admin/users/nobody/remove", &[]).await;
    assert_eq!(resp.status(), 404);

    // Remove her: the confirmation page first; then her session and token stop working.
    let (status, page) = ops.get(&s.url("/ui/admin/users/carol/remove")).await;
    assert_eq!(status, 200);
    assert!(page.contains(r#"action="/ui/admin/users/carol/remove""#));
    let resp = admin_post(&mut ops, &s, "/ui/admin/users/carol/remove", &[]).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/ui/admin/users?done=removed&name=carol");
    assert_eq!(carol.get(&s.url("/ui/admin/users")).await.0, 403, "her session ended");
    let (_, page) = carol.get(&s.url("/ui/")).await;
    assert!(!page.contains("signed-in-user"));
    assert_eq!(v2_status(&s, "carol", &secret).await, 401, "her token is refused");
    assert_eq!(v2_status(&s, "carol", "c2").await, 401, "her password is refused");
    assert!(!accounts_state(&s).0.contains("carol"));
}

#[tokio::test]
async fn admin_pages_escape_what_they_show_and_list_the_audit_trail_and_gc() {
    let s = UiServer::start_env(
        CONFIG,
        &[("STOWAGE_GC__INTERVAL_SECS", "1"), ("STOWAGE_GC__GRACE_SECS", "3600")],
    );
    let mut ops = signed_in(&s, "ops", "ops-pw").await;
    let evil = r#"<script>alert("x")</script>&'"#;
    let escaped = "&#60;script&#62;alert(&#34;x&#34;)&#60;/script&#62;&#38;&#39;";
    let scope = "<img>/**:pull";
    let resp = admin_post(
        &mut ops,
        &s,
        "/ui/admin/tokens",
        &[
            ("user", "alice"),
            ("name", evil),
            ("scopes", scope),
            ("expires_in_days", ""),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let page = resp.text().await.expect("body");
    let secret = secret_on(&page);
    assert!(page.contains(escaped) && !page.contains("<script>alert"), "{page}");
    assert!(page.contains("&#60;img&#62;/**:pull") && !page.contains("<img>"));
    let (_, list) = ops.get(&s.url("/ui/admin/tokens")).await;
    assert!(list.contains(escaped) && !list.contains("<script>alert") && !list.contains("<img"));
    assert!(!list.contains(&secret), "the list never shows the secret");
    let id = list
        .split(r#"data-revoke=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a revoke button")
        .to_owned();
    let resp = admin_post(&mut ops, &s, &format!("/ui/admin/tokens/{id}/revoke"), &[]).await;
    assert_eq!(resp.status(), 303);
    let resp = admin_post(&mut ops, &s, &format!("/ui/admin/tokens/{id}/revoke"), &[]).await;
    assert_eq!(resp.status(), 404, "a revoked token is not revoked twice");

    // The audit trail: both, by ops, the name escaped; filters echoed escaped; keyset pages.
    let (status, audit) = ops.get(&s.url("/ui/admin/audit?user=ops")).await;
    assert_eq!(status, 200);
    for action in ["token.create", "token.revoke"] {
        let row = audit
            .split("<tr ")
            .find(|r| r.contains(&format!(r#"data-action="{action}""#)))
            .unwrap_or_else(|| panic!("{action} listed:\n{audit}"));
        assert!(row.contains(r#"<td class="actor">ops"#), "{row}");
        assert!(row.contains("&#60;script&#62;"), "the token name, escaped: {row}");
    }
    assert!(!audit.contains("<script>alert") && !audit.contains(&secret));
    let (_, none) = ops.get(&s.url("/ui/admin/audit?user=nobody")).await;
    assert!(none.contains("No entries."));
    let (_, echoed) = ops.get(&s.url("/ui/admin/audit?repo=%22%3E%3Cimg%20src%3Dx%3E")).await;
    assert!(!echoed.contains("<img src=x>") && echoed.contains("&#34;&#62;&#60;img src=x&#62;"));
    assert_eq!(ops.get(&s.url("/ui/admin/audit?since=yesterday")).await.0, 400);
    // Keyset pages: the audit trail (50 rows), users and tokens (100 each).
    for i in 0..101 {
        let name = format!("u{i:03}");
        let resp = admin_post(
            &mut ops,
            &s,
            "/ui/admin/users",
            &[("name", &name), ("password", "pw"), ("again", "pw")],
        )
        .await;
        assert_eq!(resp.status(), 303);
        let resp = admin_post(
            &mut ops,
            &s,
            "/ui/admin/tokens",
            &[
                ("user", "alice"),
                ("name", &format!("t{i:03}")),
                ("scopes", "public/**:pull"),
            ],
        )
        .await;
        assert_eq!(resp.status(), 200);
    }
    let next_of = |page: &str| {
        page.split(r#"<a rel="next" href=""#)
            .nth(1)
            .and_then(|r| r.split('"').next())
            .map(|l| l.replace("&#38;", "&"))
    };
    let (_, first) = ops.get(&s.url("/ui/admin/audit?user=ops&since=1h")).await;
    assert_eq!(first.matches(r#"data-action=""#).count(), 50);
    let mut seen = first.matches(r#"data-action="user.add""#).count();
    let mut next = next_of(&first);
    let mut pages = 1;
    while let Some(link) = next {
        assert!(link.contains("user=ops") && link.contains("since=1h"), "{link}");
        let (_, page) = ops.get(&s.url(&link)).await;
        seen += page.matches(r#"data-action="user.add""#).count();
        next = next_of(&page);
        pages += 1;
    }
    assert_eq!(seen, 101, "every user.add row, once, over {pages} pages");
    // Page times at these sizes, printed for the record (speed is the benchmarks' to judge).
    for path in ["/ui/admin/users", "/ui/admin/tokens", "/ui/admin/audit", "/ui/admin/gc"] {
        let started = std::time::Instant::now();
        assert_eq!(ops.get(&s.url(path)).await.0, 200);
        println!("{path}: {} ms", started.elapsed().as_millis());
    }
    let (_, users) = ops.get(&s.url("/ui/admin/users")).await;
    assert_eq!(users.matches("<tr data-user=").count(), 100);
    let (_, rest) = ops.get(&s.url(&next_of(&users).expect("a second page of users"))).await;
    assert_eq!(rest.matches("<tr data-user=").count(), 4, "104 users in all");
    assert!(next_of(&rest).is_none());
    let (_, tokens) = ops.get(&s.url("/ui/admin/tokens")).await;
    assert_eq!(tokens.matches(r#"<tr id="token-"#).count(), 100);
    let (_, rest) = ops
        .get(&s.url(&next_of(&tokens).expect("a second page of tokens")))
        .await;
    assert_eq!(rest.matches(r#"<tr id="token-"#).count(), 2, "102 tokens in all");

    // Garbage collection: a pass shows once one has run.
    let (_, gc) = ops.get(&s.url("/ui/admin/gc")).await;
    assert!(
        gc.contains(r#"<dd id="gc-interval">1 s</dd>"#) && gc.contains(r#"<dd id="gc-grace">1 h</dd>"#),
        "{gc}"
    );
    let cookies = ops.cookie_header();
    common::wait_until("a GC pass on the admin page", || {
        let (cookies, url) = (cookies.clone(), s.url("/ui/admin/gc"));
        async move {
            let resp = client().get(url).header("Cookie", cookies).send().await.expect("GET");
            resp.text().await.expect("body").contains(r#"id="gc-last-started""#)
        }
    })
    .await;
    let (_, last) = ops.get(&s.url("/ui/admin/gc")).await;
    for id in [
        "gc-last-duration",
        "gc-last-blobs",
        "gc-last-freed",
        "gc-next",
        "gc-running",
    ] {
        assert!(last.contains(&format!(r#"id="{id}""#)), "{id}: {last}");
    }
}

#[tokio::test]
async fn spack_pages_narrow_by_facets_draw_the_dag_and_list_dependents() {
    let s = UiServer::start(CONFIG);
    // Everything but gcc-runtime: liba, libb and appc depend on it, so it is missing for them.
    s.spack_fixture("public/spack", &["gcc-runtime-"]).await;
    let mut b = Browser::default();
    let specs_of = |page: &str| -> Vec<String> {
        page.split(r#"class="spec" href=""#)
            .skip(1)
            .map(|rest| {
                let text = &rest[rest.find('>').expect(">") + 1..];
                text[..text.find('<').expect("<")].to_owned()
            })
            .collect()
    };
    // The facet link of `value` in the facet `field`, as the page has it (HTML-escaped).
    let facet_link = |page: &str, field: &str, value: &str| -> Option<(String, u64)> {
        let marker = format!(r#"data-facet="{field}" data-value="{value}""#);
        let at = page.find(&marker)?;
        let start = page[..at].rfind("href=\"")? + "href=\"".len();
        let href = page[start..start + page[start..].find('"')?].replace("&amp;", "&");
        let count_at = at + page[at..].find(r#"class="count">"#)? + r#"class="count">"#.len();
        let count = page[count_at..count_at + page[count_at..].find('<')?].parse().ok()?;
        Some((href, count))
    };
    let (status, page) = b.get(&s.url("/ui/repos/public/spack/-/spack")).await;
    assert_eq!(status, 200);
    assert!(page.contains(r#"id="spack-size">4 specs"#), "the cache's size is shown");
    assert!(page.contains("4 matching specs"));
    // appc, liba and libb are built with gcc@12.2.0; compiler-wrapper names no compiler.
    let (compiler, count) = facet_link(&page, "compiler", "gcc@12.2.0").expect("a compiler facet");
    assert_eq!(count, 3);
    let (_, count) = facet_link(&page, "target", "zen2").expect("a target facet");
    assert_eq!(count, 4);
    let (_, count) = facet_link(&page, "os", "debian12").expect("an os facet");
    assert_eq!(count, 4);
    // Narrowing by the compiler facet, then by name.
    let (status, page) = b.get(&s.url(&compiler)).await;
    assert_eq!(status, 200, "{compiler}");
    assert_eq!(specs_of(&page), ["appc", "liba", "libb"]);
    assert!(page.contains("3 matching specs"));
    assert!(
        page.contains(r#"class="facet-clear""#),
        "the chosen compiler can be cleared"
    );
    assert!(
        page.contains(r#"<input type="hidden" name="compiler" value="gcc@12.2.0">"#),
        "the search form keeps the facet"
    );
    let (_, page) = b
        .get(&s.url("/ui/repos/public/spack/-/spack?compiler=gcc%4012.2.0&name=libb"))
        .await;
    assert_eq!(specs_of(&page), ["libb"]);
    let (_, page) = b.get(&s.url("/ui/repos/public/spack/-/spack?target=skylake")).await;
    assert!(specs_of(&page).is_empty() && page.contains("0 matching specs"));
    assert_eq!(
        b.get(&s.url("/ui/repos/public/spack/-/spack?after=%3Cx%3E")).await.0,
        400,
        "a malformed cursor"
    );

    // appc's DAG: one SVG node per node (itself and its 6 dependencies), gcc-runtime marked
    // missing, gcc external, cached nodes linking to pages that open.
    let appc = "cbhp76umblq6t7nayg4dzofb4p63de3f";
    let (status, page) = b.get(&s.url(&format!("/ui/repos/public/spack/-/spack/{appc}"))).await;
    assert_eq!(status, 200);
    let svg = &page[page.find(r#"<svg id="dag""#).expect("the DAG's SVG")..];
    let svg = &svg[..svg.find("</svg>").expect("end of SVG")];
    let nodes: Vec<(&str, &str)> = svg
        .split(r#"<g class="node "#)
        .skip(1)
        .map(|rest| {
            let class = &rest[..rest.find('"').expect("class end")];
            let h = &rest[rest.find(r#"data-hash=""#).expect("hash") + 11..];
            (class, &h[..h.find('"').expect("hash end")])
        })
        .collect();
    assert_eq!(nodes.len(), 7, "{svg}");
    let class_of = |prefix: &str| {
        let table = &page[page.find(r#"id="dependencies""#).expect("the dependency table")..];
        let row = table
            .split("<tr")
            .find(|r| r.contains(&format!(">{prefix}@")))
            .expect("row");
        let hash = &row[row.find(r#"title=""#).expect("hash title") + 7..];
        let hash = &hash[..hash.find('"').expect("end")];
        nodes
            .iter()
            .find(|(_, h)| *h == hash)
            .map(|(c, _)| *c)
            .unwrap_or("absent")
    };
    assert_eq!(class_of("gcc-runtime"), "missing");
    assert_eq!(class_of("gcc"), "external");
    assert_eq!(class_of("libb"), "cached");
    assert!(nodes.iter().any(|(c, h)| *c == "root" && *h == appc));
    assert!(
        svg.contains(r#"class="edge e-link""#) && svg.contains(r#"class="edge e-build""#),
        "edge types"
    );
    let links: Vec<&str> = svg
        .split(r#"<a class="node-link" href=""#)
        .skip(1)
        .map(|rest| &rest[..rest.find('"').expect("href end")])
        .collect();
    assert_eq!(links.len(), 4, "the root and its 3 cached dependencies link: {links:?}");
    for link in links {
        assert_eq!(b.get(&s.url(link)).await.0, 200, "{link}");
    }
    assert!(!svg.contains("style="), "no inline style under the CSP");

    // liba's dependents: libb directly, appc through libb.
    let liba = "3vaqv4q37uunzetmg437xpx7ssadj3dh";
    let dependents_of = |page: &str| -> Vec<String> {
        page.split(r#"class="dependent" href=""#)
            .skip(1)
            .map(|rest| {
                let text = &rest[rest.find('>').expect(">") + 1..];
                text[..text.find('<').expect("<")].to_owned()
            })
            .collect()
    };
    let (_, page) = b.get(&s.url(&format!("/ui/repos/public/spack/-/spack/{liba}"))).await;
    assert_eq!(dependents_of(&page), ["libb@2.1"]);
    let (_, page) = b
        .get(&s.url(&format!("/ui/repos/public/spack/-/spack/{liba}?transitive=1")))
        .await;
    assert_eq!(dependents_of(&page), ["appc@0.3", "libb@2.1"]);
    let (_, page) = b.get(&s.url(&format!("/ui/repos/public/spack/-/spack/{appc}"))).await;
    assert!(page.contains(r#"id="no-dependents""#), "nothing depends on appc");

    // A version and a variant value with HTML-special characters: escaped in the page and in
    // its SVG, never markup.
    let marked = "escapeaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let version = s.spack_spec_with_markup("public/spack", marked).await;
    let (status, page) = b.get(&s.url(&format!("/ui/repos/public/spack/-/spack/{marked}"))).await;
    assert_eq!(status, 200);
    assert!(!page.contains(&version), "the raw version is never in the page");
    assert!(!page.contains("<script>alert"), "the raw variant is never in the page");
    // askama escapes with numeric references.
    let escaped = "1.0&#60;b&#62;&#38;&#34;x&#39;";
    assert!(
        page.contains(&format!("<h1 id=\"spec-title\">liba@{escaped}</h1>")),
        "{page}"
    );
    assert!(
        page.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "the variant, escaped"
    );
    let svg = &page[page.find(r#"<svg id="dag""#).expect("the DAG's SVG")..];
    let svg = &svg[..svg.find("</svg>").expect("end of SVG")];
    assert!(
        svg.contains(&format!(">liba@{escaped}</text>")),
        "the SVG's label is escaped: {svg}"
    );
    assert!(!svg.contains("<b>"));
    // It appears escaped on the search page too.
    let (_, page) = b.get(&s.url("/ui/repos/public/spack/-/spack?name=liba")).await;
    assert!(page.contains(escaped) && !page.contains(&version));
}

/// Specs seeded into the catalog for the Spack pages' timing test.
const SCALE_SPECS: usize = 50_000;

/// Writes `SCALE_SPECS` synthetic specs into `repo` of the stopped server's catalog, each with
/// a node of realistic size (about 1 KB of JSON) depending on `dependency`, over 2,000 names,
/// 4 compilers, 5 targets and 3 oses. Pushing them over HTTP would take minutes; what is timed
/// is reading them.
///
/// Each table's rows are made a chunk of specs at a time by one statement (from a recursive
/// count, in SQL both engines run), one transaction per chunk: all of them on SQLite, 500 on
/// PostgreSQL. There the catalog's triggers update the same rows (the repository's figures and
/// index figures, the index's dirty segments) for every spec, and the versions of a row that a
/// transaction leaves cannot be pruned before it ends, so the time a transaction takes grows
/// with the square of its specs: minutes for all of them at once, half a minute in chunks
/// (most of it the triggers' own work). SQLite takes 3 times longer in chunks.
fn seed_specs(db: &CatalogSql, repo: &str, dependency: &str) {
    let repo_id = db.query_i64("SELECT id FROM repositories WHERE name = ?1", &[repo.into()]);
    let manifest_id = db.query_i64(
        "SELECT manifest_id FROM spack_specs WHERE repo_id = ?1 AND hash = ?2",
        &[repo_id.into(), dependency.into()],
    );
    let padding = "x".repeat(900);
    // Spec i: name pkg<i % 2000, 4 digits>, version 1.<i / 2000>, hash s<i, 31 digits>, one of
    // 4 compilers, 5 targets and 3 oses in turn, tag <name>-<version>-<hash>.spack.
    let specs = |from: usize, to: usize| {
        format!(
            "WITH RECURSIVE n(i, z) AS (
             SELECT CAST({from} AS BIGINT), CAST('{zeros}' || {from} AS TEXT)
             UNION ALL
             SELECT i + 1, '{zeros}' || (i + 1) FROM n WHERE i + 1 < {to}
         ),
         named(i, name, version, hash) AS (
             SELECT i, 'pkg' || substr('000' || (i % 2000), length('000' || (i % 2000)) - 3),
                    '1.' || (i / 2000), 's' || substr(z, length(z) - 30)
               FROM n
         ),
         spec(i, name, version, hash, tag, compiler, target, os) AS (
             SELECT i, name, version, hash, name || '-' || version || '-' || hash || '.spack',
                    CASE i % 4 WHEN 0 THEN 'gcc@12.2.0' WHEN 1 THEN 'gcc@13.2.0'
                               WHEN 2 THEN 'clang@17.0.6' ELSE 'oneapi@2024.1' END,
                    CASE i % 5 WHEN 0 THEN 'zen2' WHEN 1 THEN 'zen3' WHEN 2 THEN 'skylake_avx512'
                               WHEN 3 THEN 'x86_64_v3' ELSE 'neoverse_v1' END,
                    CASE i % 3 WHEN 0 THEN 'debian12' WHEN 1 THEN 'ubuntu22.04' ELSE 'rhel9' END
               FROM named
         )",
            zeros = "0".repeat(30),
        )
    };
    let (repo_id, manifest_id, dependency) = (Param::from(repo_id), Param::from(manifest_id), Param::from(dependency));
    let inserts = [
        (
            "INSERT INTO tags (repo_id, name, manifest_id, updated_at)
             SELECT ?1, tag, ?2, 0 FROM spec ORDER BY i"
                .to_owned(),
            vec![repo_id.clone(), manifest_id.clone()],
        ),
        (
            format!(
                "INSERT INTO spack_nodes (repo_id, hash, name, version, platform, os, target, compiler, external, node)
                 SELECT ?1, hash, name, version, 'linux', os, target, compiler, 0,
                        '{{\"name\":\"' || name || '\",\"version\":\"' || version || '\",\"hash\":\"' || hash
                        || '\",\"pad\":\"{padding}\"}}'
                   FROM spec ORDER BY i"
            ),
            vec![repo_id.clone()],
        ),
        (
            "INSERT INTO spack_deps (repo_id, hash, dep_hash, deptypes)
             SELECT ?1, hash, ?2, '[\"build\",\"link\"]' FROM spec ORDER BY i"
                .to_owned(),
            vec![repo_id.clone(), dependency.clone()],
        ),
        (
            "INSERT INTO spack_specs (repo_id, tag, hash, manifest_id, layout_version, name, version, platform, os, target, compiler)
             SELECT ?1, tag, hash, ?2, 3, name, version, 'linux', os, target, compiler FROM spec ORDER BY i"
                .to_owned(),
            vec![repo_id.clone(), manifest_id.clone()],
        ),
        (
            "INSERT INTO spack_closure (repo_id, tag, hash) SELECT ?1, tag, hash FROM spec ORDER BY i".to_owned(),
            vec![repo_id.clone()],
        ),
        (
            "INSERT INTO spack_closure (repo_id, tag, hash) SELECT ?1, tag, ?2 FROM spec ORDER BY i".to_owned(),
            vec![repo_id, dependency],
        ),
    ];
    let chunk = match db.catalog() {
        common::Catalog::Sqlite => SCALE_SPECS,
        common::Catalog::Postgres => 500,
    };
    for from in (0..SCALE_SPECS).step_by(chunk) {
        let to = (from + chunk).min(SCALE_SPECS);
        let specs = specs(from, to);
        db.execute_batch("BEGIN");
        for (insert, params) in &inserts {
            let added = db.execute(&format!("{specs}\n{insert}"), params);
            assert_eq!(added, (to - from) as u64, "{insert}");
        }
        db.execute_batch("COMMIT");
        // PostgreSQL plans the triggers' queries from the tables' statistics, which must
        // follow their growth from a few rows to many (its autovacuum lags behind).
        if db.catalog() == common::Catalog::Postgres && from % 5_000 == 0 {
            db.execute_batch("ANALYZE");
        }
    }
}

#[tokio::test]
async fn spack_pages_show_what_they_should_at_fifty_thousand_specs() {
    let mut s = UiServer::start(CONFIG);
    s.spack_fixture("public/spack", &[]).await;
    let liba = "3vaqv4q37uunzetmg437xpx7ssadj3dh";
    s.server.terminate();
    let started = std::time::Instant::now();
    let catalog = s.server.catalog_sql();
    tokio::task::spawn_blocking(move || seed_specs(&catalog, "public/spack", liba))
        .await
        .expect("seed");
    println!("seeded {SCALE_SPECS} specs in {:.1} s", started.elapsed().as_secs_f64());
    s.server.crash_and_restart();

    let time = |path: String, expect: &'static str| {
        let url = s.url(&path);
        async move {
            // The median of five, after one warm-up request.
            let mut ms = Vec::new();
            for i in 0..6 {
                let t = std::time::Instant::now();
                let resp = client().get(&url).send().await.expect("GET");
                assert_eq!(resp.status(), 200, "{path}");
                let body = resp.text().await.expect("body");
                if i > 0 {
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                assert!(body.contains(expect), "{path} shows {expect}");
            }
            ms.sort_by(f64::total_cmp);
            (path, ms[ms.len() / 2])
        }
    };
    let spack = "/ui/repos/public/spack/-/spack";
    let last_name = format!("pkg1999-1.24-s{:031}.spack", SCALE_SPECS - 1);
    let mut worst = 0.0f64;
    for (path, median) in [
        time(spack.to_owned(), "50005 matching specs").await,
        time(format!("{spack}?name=pkg0042"), "25 matching specs").await,
        time(format!("{spack}?compiler=gcc%4013.2.0"), "12500 matching specs").await,
        time(format!("{spack}?target=neoverse_v1&os=rhel9"), "3333 matching specs").await,
        time(
            format!("{spack}?compiler=clang&after=pkg1500-1.0"),
            "12500 matching specs",
        )
        .await,
        time(format!("{spack}?after={last_name}"), "50005 matching specs").await,
        time(format!("{spack}/{liba}"), "pkg0000@1.0").await,
        time(format!("{spack}/{liba}?transitive=1&after=pkg1000"), "pkg1000@").await,
        time(
            format!(
                "/stowage/v1/spack/public/spack/specs/{liba}/dependents?limit=100&after=s{:031}",
                40_000
            ),
            "\"next\":",
        )
        .await,
    ] {
        println!("{path}: median {median:.1} ms");
        worst = worst.max(median);
    }
    // Speed is the UI benchmark's to measure (`cargo bench --bench ui`); this test holds what
    // each page shows at 50,000 specs, and prints its times.
    println!("slowest page (median): {worst:.0} ms");
}
