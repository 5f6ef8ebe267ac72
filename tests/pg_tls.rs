//! TLS to the PostgreSQL catalog (`sslmode=require` in `catalog.url`, `catalog.tls_ca_file`).
//!
//! The shared test server accepts TCP logins over TLS only, with a certificate for 127.0.0.1
//! signed by a certificate authority of the test's own (`common::postgres`), so every test on
//! the PostgreSQL catalog already connects that way. These tests check what that relies on:
//! - every connection a server opens to its database is TLS;
//! - a certificate that `catalog.tls_ca_file` does not vouch for, or that names another host,
//!   is refused, and so is a connection without TLS;
//! - libpq's `sslmode` values the driver does not know, and a CA file without
//!   `sslmode=require`, are configuration errors that say what to write instead.
//!
//! They run on the PostgreSQL catalog whatever `STOWAGE_TEST_CATALOG` says, and fail, never
//! skip, without PostgreSQL.

mod common;

use common::postgres::test_certificates;
use common::sql::Value;
use common::{Catalog, TestServer};

/// Runs `stowage migrate` for `server`'s database with `envs` replacing its own and `unset`
/// removed; its exit status and standard error.
fn migrate_with(server: &TestServer, envs: &[(&str, &str)], unset: &[&str]) -> (bool, String) {
    let mut cmd = server.stowage_command(&["migrate"]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    for k in unset {
        cmd.env_remove(k);
    }
    let out = cmd.output().expect("run stowage migrate");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `server`'s `catalog.url` with `from` replaced by `to`.
fn url_with(server: &TestServer, from: &str, to: &str) -> String {
    let url = server.env("STOWAGE_CATALOG__URL").expect("a PostgreSQL catalog URL");
    assert!(url.contains(from), "{url} holds {from}");
    url.replace(from, to)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalog_connection_is_tls() {
    let server = TestServer::start_on_catalog(Catalog::Postgres, &[]);
    // Reads and writes, so that the writer and readers have connected.
    let digest = common::push_blob(&server, "tls/probe", b"over TLS").await;
    let resp = common::client()
        .get(server.v2(&format!("tls/probe/blobs/{digest}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);

    let sql = server.catalog_sql();
    let rows = tokio::task::block_in_place(|| {
        sql.query_rows(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
                AND a.application_name = 'stowage'",
            &[],
        )
    });
    let (tls, plain) = (rows[0][0].int(), rows[0][1].int());
    assert!(tls >= 2, "the server's connections use TLS (found {tls})");
    assert_eq!(plain, 0, "no connection of the server's without TLS");
    let version = tokio::task::block_in_place(|| {
        sql.query_rows(
            "SELECT DISTINCT s.version FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.datname = current_database() AND a.application_name = 'stowage'",
            &[],
        )
    });
    assert!(
        version
            .iter()
            .all(|r| matches!(&r[0], Value::Text(v) if v == "TLSv1.3" || v == "TLSv1.2")),
        "TLS 1.2 or 1.3: {version:?}"
    );
}

#[test]
fn a_certificate_not_vouched_for_or_for_another_host_is_refused() {
    let server = TestServer::start_on_catalog(Catalog::Postgres, &[]);
    let (ok, stderr) = migrate_with(&server, &[], &[]);
    assert!(ok, "migrate with the right CA: {stderr}");

    // Another authority's certificate as the only one trusted.
    let dir = tempfile::tempdir().expect("temp dir");
    let (other_ca, _, _) = test_certificates(&["127.0.0.1"]);
    let other = dir.path().join("other-ca.crt");
    std::fs::write(&other, other_ca).expect("write the other CA");
    let (ok, stderr) = migrate_with(
        &server,
        &[("STOWAGE_CATALOG__TLS_CA_FILE", other.to_str().expect("path"))],
        &[],
    );
    assert!(!ok, "a certificate of an authority not trusted is refused");
    assert!(
        stderr.contains("invalid peer certificate"),
        "the error says why: {stderr}"
    );

    // The right authority, but the certificate names 127.0.0.1, not localhost.
    let url = url_with(&server, "@127.0.0.1:", "@localhost:");
    let (ok, stderr) = migrate_with(&server, &[("STOWAGE_CATALOG__URL", &url)], &[]);
    assert!(!ok, "a certificate for another host is refused");
    assert!(
        stderr.contains("certificate not valid for name \"localhost\""),
        "the error says why: {stderr}"
    );

    // Without TLS the server has no way in for the role.
    let url = url_with(&server, "?sslmode=require", "");
    let (ok, stderr) = migrate_with(
        &server,
        &[("STOWAGE_CATALOG__URL", &url)],
        &["STOWAGE_CATALOG__TLS_CA_FILE"],
    );
    assert!(!ok, "a connection without TLS is refused by this server");
    assert!(stderr.contains("no encryption"), "the server's reason: {stderr}");
}

#[test]
fn sslmode_values_the_driver_does_not_know_are_explained() {
    let server = TestServer::start_on_catalog(Catalog::Postgres, &[]);
    for mode in ["verify-full", "verify-ca"] {
        let url = url_with(&server, "sslmode=require", &format!("sslmode={mode}"));
        let (ok, stderr) = migrate_with(&server, &[("STOWAGE_CATALOG__URL", &url)], &[]);
        assert!(!ok, "sslmode={mode} is refused");
        assert!(
            stderr.contains("require checks the server's certificate and host name"),
            "sslmode={mode}: the error says what to write: {stderr}"
        );
    }
    let url = url_with(&server, "?sslmode=require", "?sslmode=prefer");
    let (ok, stderr) = migrate_with(&server, &[("STOWAGE_CATALOG__URL", &url)], &[]);
    assert!(!ok, "a CA file without sslmode=require is refused");
    assert!(
        stderr.contains("catalog.tls_ca_file is set but catalog.url does not say sslmode=require"),
        "{stderr}"
    );
}
