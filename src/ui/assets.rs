//! The UI's static files, compiled into the binary: the stylesheet and script of `web/static/`
//! and the vendored htmx of `web/vendor/` (pinned; its licence and checksum are beside it).
//!
//! Each is served at `/ui/assets/<hash>/<name>`, where `<hash>` is the first 16 hex digits of
//! the SHA-256 of its bytes, with `Cache-Control: public, max-age=31536000, immutable`: a new
//! build with changed files has new URLs, so a browser never keeps a stale copy. A request with
//! any other hash is answered 404.

use std::sync::OnceLock;

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::{HttpResponse, web};
use sha2::Digest as _;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../web/static/style.css"),
    },
    Asset {
        name: "ui.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../web/static/ui.js"),
    },
    Asset {
        name: "htmx.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../web/vendor/htmx-2.0.11.min.js"),
    },
];

fn hashes() -> &'static [String] {
    static HASHES: OnceLock<Vec<String>> = OnceLock::new();
    HASHES.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| hex::encode(&sha2::Sha256::digest(a.bytes)[..8]))
            .collect()
    })
}

/// The URL of asset `name` (one of the names above).
pub fn url(name: &str) -> String {
    match ASSETS.iter().position(|a| a.name == name) {
        Some(i) => format!("/ui/assets/{}/{name}", hashes()[i]),
        None => format!("/ui/assets/-/{name}"),
    }
}

/// `GET /ui/assets/{hash}/{name}`.
pub async fn serve(path: web::Path<(String, String)>) -> HttpResponse {
    let (hash, name) = path.into_inner();
    let found = ASSETS.iter().zip(hashes()).find(|(a, h)| a.name == name && **h == hash);
    match found {
        Some((asset, _)) => HttpResponse::Ok()
            .insert_header((CONTENT_TYPE, asset.content_type))
            .insert_header((CACHE_CONTROL, "public, max-age=31536000, immutable"))
            .body(asset.bytes),
        None => HttpResponse::NotFound()
            .insert_header((CONTENT_TYPE, "text/plain; charset=utf-8"))
            .body("no such asset"),
    }
}
