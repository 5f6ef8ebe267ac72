//! Native HTTPS: with `[tls]` set the registry serves the whole API over TLS only.

mod common;

use common::{TestServer, sha256};

struct Certs {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    pem: String,
}

fn self_signed() -> Certs {
    let dir = tempfile::tempdir().expect("temp dir");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("generate certificate");
    let pem = ck.cert.pem();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &pem).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    Certs {
        _dir: dir,
        cert,
        key,
        pem,
    }
}

fn https_client(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("parse cert"))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

#[tokio::test]
async fn serves_the_api_over_https_with_the_configured_certificate() {
    let certs = self_signed();
    let (cert, key) = (
        certs.cert.to_string_lossy().into_owned(),
        certs.key.to_string_lossy().into_owned(),
    );
    let server = TestServer::start_with(&[("STOWAGE_TLS__CERT", &cert), ("STOWAGE_TLS__KEY", &key)]);
    assert!(
        server.url.starts_with("https://"),
        "the server announces https: {}",
        server.url
    );
    let http = https_client(&certs.pem);

    let resp = http.get(server.v2("")).send().await.expect("GET /v2/ over TLS");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-distribution-api-version"], "registry/2.0");

    // A whole upload and download over TLS.
    let data = vec![7u8; 300_000];
    let digest = sha256(&data);
    let resp = http
        .post(server.v2(&format!("tls/repo/blobs/uploads/?digest={digest}")))
        .body(data.clone())
        .send()
        .await
        .expect("POST blob");
    assert_eq!(resp.status(), 201);
    let got = http
        .get(server.v2(&format!("tls/repo/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.expect("body").as_ref(), data.as_slice());

    // Plain HTTP is not served on a TLS listener.
    let plain = server.url.replacen("https://", "http://", 1);
    let resp = reqwest::Client::new().get(format!("{plain}/v2/")).send().await;
    assert!(resp.is_err() || !resp.expect("response").status().is_success());

    // A client that does not trust the certificate is refused.
    let untrusted = reqwest::Client::new().get(server.v2("")).send().await;
    assert!(untrusted.is_err(), "an untrusted certificate must fail the handshake");
}

#[tokio::test]
async fn a_half_configured_tls_section_refuses_to_start() {
    let certs = self_signed();
    let cert = certs.cert.to_string_lossy().into_owned();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("serve")
        .env("STOWAGE_LISTEN", "127.0.0.1:0")
        .env("STOWAGE_DATA_DIR", dir.path())
        .env("STOWAGE_TLS__CERT", &cert)
        .output()
        .expect("run stowage");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tls.cert and tls.key"), "says what is wrong: {stderr}");
}
