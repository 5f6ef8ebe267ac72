//! Assertions shared by the endpoint tests: the spec's error codes and the error-body check.

use reqwest::Response;
use serde_json::Value;

/// Every error code the distribution spec defines (a response's code must be one of them).
pub const SPEC_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "MANIFEST_UNVERIFIED",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

/// A response header as a string.
pub fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header").to_string())
}

/// Checks status, JSON content type, the API version header and that `errors[0].code` is one of
/// `codes`. Returns the parsed body.
pub async fn assert_error(resp: Response, status: u16, codes: &[&str]) -> Value {
    let got = resp.status().as_u16();
    let ct = header(&resp, "content-type").unwrap_or_default();
    let version = header(&resp, "docker-distribution-api-version");
    let body = resp.bytes().await.expect("read error body");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(got, status, "status (body: {text})");
    assert!(
        ct.starts_with("application/json"),
        "error Content-Type {ct:?} (body: {text})"
    );
    assert_eq!(version.as_deref(), Some("registry/2.0"), "API version header on error");
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    let code = v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {text}"));
    assert!(
        codes.contains(&code),
        "errors[0].code {code:?} not in {codes:?} (body: {text})"
    );
    v
}

/// `sha512:<hex>` of `data`.
pub fn sha512(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)))
}
