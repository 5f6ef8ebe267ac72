//! The UI's Spack pages: a build cache's search page and a spec's page.
//!
//! - Search (`GET /ui/repos/<name>/-/spack?name=&version=&compiler=&target=&os=&after=`): exact
//!   matches on each field given (a compiler without `@` matches all its versions), keyset pages
//!   in tag order (`after` = the last tag shown), facet counts per compiler, target and os of the
//!   current query (each a link narrowing it), and the cache's index generation and size. All of
//!   it from `catalog::spack`'s indexed queries, the ones the Spack API asks.
//! - Spec (`GET /ui/repos/<name>/-/spack/<hash>?transitive=1&after=`): variants; the DAG drawn
//!   as SVG from the layout of `dag` (cached, missing and external nodes styled apart, each
//!   cached one linking to its page; edge types by class); the table of which dependencies the
//!   cache holds; the cached specs depending on it (the Spack API's `dependents` query, direct
//!   or transitive, in pages); the `spack mirror add` and `spack install` lines.
//!
//! Every value on these pages (names, versions, variants: client data) goes through askama's
//! escaping, the SVG's text and attributes included; the SVG is styled by classes only, so the
//! UI's Content-Security-Policy (no inline style) holds.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, web};
use askama::Template;

use super::dag;
use super::pages::{Chrome, readable_repo, registry_host, render, text_of};
use super::{UiError, Viewer, html, view};
use crate::auth::Auth;
use crate::catalog::SpecQuery;
use crate::oci::RepoName;
use crate::registry::Registry;

type Page = Result<actix_web::HttpResponse, UiError>;

/// Specs per page of a search.
const SPECS_PAGE: u64 = 50;
/// Values listed per facet (the most frequent).
const FACET_VALUES: usize = 20;
/// Dependents per page of a spec page.
const DEPENDENTS_PAGE: u64 = 50;
/// The search fields, in the order links carry them.
const FIELDS: [&str; 5] = ["name", "version", "compiler", "target", "os"];

/// The `spack mirror add` line for a build cache.
fn mirror_line(host: &str, repo: &RepoName) -> String {
    let name = repo.as_str().rsplit('/').next().unwrap_or("stowage");
    format!("spack mirror add {name} oci://{host}/{repo}")
}

fn arch_of(platform: Option<&str>, os: Option<&str>, target: Option<&str>) -> String {
    [platform, os, target]
        .into_iter()
        .map(|p| p.unwrap_or("?"))
        .collect::<Vec<_>>()
        .join("-")
}

/// A search field: letters, digits and `-_.+@=:` (what spec names, versions, compilers,
/// targets and oses use), at most 128 bytes.
fn spack_field(q: &[(String, String)], key: &str) -> Result<String, UiError> {
    let v = crate::http::query_param(q, key).unwrap_or_default().trim();
    let ok = v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b'@' | b'=' | b':'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(UiError::BadRequest(
            "a Spack search field is at most 128 letters, digits and - _ . + @ = :",
        ))
    }
}

/// A page cursor: a spec tag or a hash (letters, digits, `-_.`), at most 256 bytes.
fn cursor(q: &[(String, String)]) -> Result<Option<String>, UiError> {
    match crate::http::query_param(q, "after") {
        None | Some("") => Ok(None),
        Some(a)
            if a.len() <= 256
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            Ok(Some(a.to_owned()))
        }
        Some(_) => Err(UiError::BadRequest("after is the cursor of a Next page link")),
    }
}

/// The search page's URL with `fields` (empty ones left out).
fn search_link(repo: &str, fields: &[(&str, &str)]) -> String {
    let query: Vec<String> = fields
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", view::query_value(v)))
        .collect();
    let mut link = format!("/ui/repos/{repo}/-/spack");
    if !query.is_empty() {
        link.push('?');
        link.push_str(&query.join("&"));
    }
    link
}

struct SpecRow {
    hash: String,
    short_hash: String,
    name: String,
    version: String,
    compiler: String,
    arch: String,
}

/// One value of a facet: its count and the link narrowing the search to it.
struct FacetValue {
    value: String,
    count: u64,
    link: String,
}

/// A facet: its field, its values, and (when the search is narrowed by it) the value chosen
/// and the link widening the search again.
struct Facet {
    field: &'static str,
    title: &'static str,
    values: Vec<FacetValue>,
    /// More values than listed.
    more: usize,
    chosen: Option<String>,
    clear: String,
}

#[derive(Template)]
#[template(path = "spack.html")]
struct SpackPage {
    chrome: Chrome,
    repo: String,
    name: String,
    version: String,
    compiler: String,
    target: String,
    os: String,
    narrowed: bool,
    generation: i64,
    built_generation: Option<i64>,
    total_specs: u64,
    index_size: Option<String>,
    matching: u64,
    facets: Vec<Facet>,
    specs: Vec<SpecRow>,
    next: Option<String>,
    mirror: String,
}

/// `GET /ui/repos/<name>/-/spack`: a build cache's specs, searched, faceted, in keyset pages.
pub async fn search(
    req: HttpRequest,
    reg: web::Data<Registry>,
    auth: web::Data<Auth>,
    ui: web::Data<super::Ui>,
) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    let repo = readable_repo(&req, &auth, &viewer)?;
    let q = crate::http::query(&req);
    let mut values = Vec::with_capacity(FIELDS.len());
    for f in FIELDS {
        values.push(spack_field(&q, f)?);
    }
    let after = cursor(&q)?;
    let state = reg.catalog().spack_index_state(&repo).await?.ok_or(UiError::NotFound)?;
    let given = |i: usize| Some(values[i].clone()).filter(|v| !v.is_empty());
    let query = SpecQuery {
        name: given(0),
        version: given(1),
        compiler: given(2),
        target: given(3),
        os: given(4),
        after,
        limit: SPECS_PAGE + 1,
        ..Default::default()
    };
    let facets = reg
        .catalog()
        .spack_facets(&repo, query.clone())
        .await?
        .ok_or(UiError::NotFound)?;
    let mut found = reg
        .catalog()
        .spack_specs(&repo, query)
        .await?
        .ok_or(UiError::NotFound)?;
    let (total_specs, index_bytes) = reg.catalog().spack_cache_size(&repo).await?;
    let fields: Vec<(&str, &str)> = FIELDS.iter().copied().zip(values.iter().map(String::as_str)).collect();
    let with = |field: &str, value: &str| -> String {
        let f: Vec<(&str, &str)> = fields
            .iter()
            .map(|&(k, v)| if k == field { (k, value) } else { (k, v) })
            .collect();
        search_link(repo.as_str(), &f)
    };
    let next = (found.len() as u64 > SPECS_PAGE).then(|| {
        found.truncate(SPECS_PAGE as usize);
        let mut f = fields.clone();
        let last = found.last().map(|s| s.tag.as_str()).unwrap_or_default();
        f.push(("after", last));
        search_link(repo.as_str(), &f)
    });
    let facet = |field: &'static str, title: &'static str, counts: Vec<(String, u64)>| {
        let chosen = fields
            .iter()
            .find(|(k, _)| *k == field)
            .map(|(_, v)| (*v).to_owned())
            .filter(|v| !v.is_empty());
        Facet {
            field,
            title,
            more: counts.len().saturating_sub(FACET_VALUES),
            values: counts
                .into_iter()
                .take(FACET_VALUES)
                .map(|(value, count)| FacetValue {
                    link: with(field, &value),
                    value,
                    count,
                })
                .collect(),
            clear: with(field, ""),
            chosen,
        }
    };
    let facet_list = vec![
        facet("compiler", "Compiler", facets.compilers),
        facet("target", "Target", facets.targets),
        facet("os", "OS", facets.oses),
    ];
    let specs = found
        .into_iter()
        .map(|s| SpecRow {
            short_hash: s.hash.chars().take(7).collect(),
            arch: arch_of(s.platform.as_deref(), s.os.as_deref(), s.target.as_deref()),
            compiler: s.compiler.unwrap_or_default(),
            hash: s.hash,
            name: s.name,
            version: s.version,
        })
        .collect();
    let [name, version, compiler, target, os] = <[String; 5]>::try_from(values).map_err(|_| UiError::Failed)?;
    let page = SpackPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), auth.enabled()),
        mirror: mirror_line(&registry_host(&auth, &req), &repo),
        repo: repo.to_string(),
        narrowed: [&name, &version, &compiler, &target, &os].iter().any(|v| !v.is_empty()),
        name,
        version,
        compiler,
        target,
        os,
        generation: state.generation,
        built_generation: state.built_generation,
        total_specs,
        index_size: index_bytes.map(view::size),
        matching: facets.total,
        facets: facet_list,
        specs,
        next,
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

struct DependencyRow {
    hash: String,
    short_hash: String,
    name: String,
    version: String,
    cached: bool,
    external: bool,
    /// The dependency types of a direct dependency (`build, link`), or empty for a transitive one.
    deptypes: String,
}

struct DependentRow {
    hash: String,
    short_hash: String,
    name: String,
    version: String,
    /// `build, link` for a direct dependent, empty for a transitive one.
    deptypes: String,
}

#[derive(Template)]
#[template(path = "spack_spec.html")]
struct SpackSpecPage {
    chrome: Chrome,
    repo: String,
    hash: String,
    name: String,
    version: String,
    compiler: String,
    arch: String,
    tag: String,
    variants: Vec<(String, String)>,
    dependencies: Vec<DependencyRow>,
    missing: usize,
    dag: dag::Layout,
    dependents: Vec<DependentRow>,
    transitive: bool,
    dependents_next: Option<String>,
    mirror: String,
    install: String,
}

fn deptypes_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|t| t.as_str()).collect::<Vec<_>>().join(", "),
        _ => String::new(),
    }
}

/// `GET /ui/repos/<name>/-/spack/<hash>`: one spec, its variants, its DAG drawn and listed with
/// which dependencies the cache holds, and the cached specs depending on it.
pub async fn spec(req: HttpRequest, reg: web::Data<Registry>, auth: web::Data<Auth>, ui: web::Data<super::Ui>) -> Page {
    let viewer = Viewer::of(&req, &auth, &ui).await?;
    let repo = readable_repo(&req, &auth, &viewer)?;
    let hash = req
        .match_info()
        .get("hash")
        .filter(|h| h.len() <= 64 && !h.is_empty() && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        .ok_or(UiError::NotFound)?
        .to_owned();
    let q = crate::http::query(&req);
    let transitive = matches!(crate::http::query_param(&q, "transitive"), Some("1"));
    let after = cursor(&q)?;
    let spec = reg
        .catalog()
        .spack_spec(&repo, hash.clone())
        .await?
        .ok_or(UiError::NotFound)?;
    let page_of_dependents = reg
        .catalog()
        .spack_dependents(&repo, hash, transitive, after, DEPENDENTS_PAGE)
        .await?
        .ok_or(UiError::NotFound)?;
    let variants = match spec.node.get("parameters") {
        Some(serde_json::Value::Object(p)) => p
            .iter()
            .filter(|(_, v)| !matches!(v, serde_json::Value::Array(a) if a.is_empty()))
            .map(|(k, v)| (k.clone(), text_of(v)))
            .collect(),
        _ => Vec::new(),
    };
    let s = spec.summary;
    let spec_link = |h: &str| format!("/ui/repos/{repo}/-/spack/{h}");
    let mut nodes = vec![dag::Node {
        id: s.hash.clone(),
        label: format!("{}@{}", s.name, s.version),
        href: Some(spec_link(&s.hash)),
        class: "root",
        title: format!("{}@{} /{} (this spec)", s.name, s.version, s.hash),
    }];
    nodes.extend(spec.dependencies.iter().map(|d| {
        let (class, state) = if d.in_buildcache {
            ("cached", "in this cache")
        } else if d.external {
            ("external", "external")
        } else {
            ("missing", "missing from this cache")
        };
        dag::Node {
            id: d.hash.clone(),
            label: format!("{}@{}", d.name, d.version),
            href: d.in_buildcache.then(|| spec_link(&d.hash)),
            class,
            title: format!("{}@{} /{}: {state}", d.name, d.version, d.hash),
        }
    }));
    let edges: Vec<dag::Edge> = spec
        .edges
        .into_iter()
        .map(|e| dag::Edge {
            from: e.from,
            to: e.to,
            deptypes: e.deptypes,
        })
        .collect();
    let drawing = dag::layout(nodes, &edges);
    let dependencies: Vec<DependencyRow> = spec
        .dependencies
        .into_iter()
        .map(|d| DependencyRow {
            short_hash: d.hash.chars().take(7).collect(),
            cached: d.in_buildcache,
            external: d.external,
            deptypes: deptypes_text(d.deptypes.as_ref()),
            hash: d.hash,
            name: d.name,
            version: d.version,
        })
        .collect();
    let missing = dependencies.iter().filter(|d| !d.cached && !d.external).count();
    let dependents = page_of_dependents
        .dependents
        .into_iter()
        .map(|d| DependentRow {
            short_hash: d.hash.chars().take(7).collect(),
            deptypes: deptypes_text(d.deptypes.as_ref()),
            hash: d.hash,
            name: d.name,
            version: d.version,
        })
        .collect();
    let dependents_next = page_of_dependents.next.map(|after| {
        format!(
            "{}?{}after={}#dependents",
            spec_link(&s.hash),
            if transitive { "transitive=1&" } else { "" },
            view::query_value(&after)
        )
    });
    let page = SpackSpecPage {
        chrome: Chrome::new(Some(&viewer), viewer.csrf(&ui), auth.enabled()),
        mirror: mirror_line(&registry_host(&auth, &req), &repo),
        install: format!("spack install --cache-only {}@{}/{}", s.name, s.version, s.hash),
        repo: repo.to_string(),
        arch: arch_of(s.platform.as_deref(), s.os.as_deref(), s.target.as_deref()),
        compiler: s.compiler.unwrap_or_default(),
        hash: s.hash,
        name: s.name,
        version: s.version,
        tag: s.tag,
        variants,
        dependencies,
        missing,
        dag: drawing,
        dependents,
        transitive,
        dependents_next,
    };
    Ok(html(&viewer, StatusCode::OK, render(&page)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_links_carry_the_fields_given_encoded() {
        assert_eq!(search_link("a/b", &[("name", ""), ("os", "")]), "/ui/repos/a/b/-/spack");
        assert_eq!(
            search_link("a/b", &[("name", "zlib"), ("compiler", "gcc@12.2.0"), ("os", "")]),
            "/ui/repos/a/b/-/spack?name=zlib&compiler=gcc%4012.2.0"
        );
    }
}
