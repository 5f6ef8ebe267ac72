//! Reading a spec image's config: the nodes of the spec's DAG and what the index needs of them.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A spec image's config, reduced to what the catalog records.
#[derive(Debug, Clone)]
pub struct SpecImage {
    /// DAG hash of the package itself (`spec.nodes[0]`).
    pub hash: String,
    /// `buildcache_layout_version` (2 for Spack 0.22–0.23, 3 from 1.0).
    pub layout_version: i64,
    /// Every node of the DAG, the package first.
    pub nodes: Vec<SpecNode>,
}

/// One node of a spec DAG.
#[derive(Debug, Clone)]
pub struct SpecNode {
    pub hash: String,
    pub name: String,
    pub version: String,
    pub platform: Option<String>,
    pub os: Option<String>,
    pub target: Option<String>,
    /// `name@version` of the node's compiler, when it names one.
    pub compiler: Option<String>,
    pub external: bool,
    /// `(dependency hash, deptypes as a JSON array)`.
    pub dependencies: Vec<(String, String)>,
    /// The node exactly as the config holds it.
    pub json: String,
}

#[derive(Deserialize)]
struct RawConfig<'a> {
    #[serde(borrow)]
    spec: Option<RawSpec<'a>>,
    buildcache_layout_version: Option<i64>,
    binary_cache_checksum: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawSpec<'a> {
    #[serde(borrow)]
    nodes: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawNode {
    name: String,
    #[serde(default)]
    version: Option<serde_json::Value>,
    hash: String,
    #[serde(default)]
    arch: Option<RawArch>,
    #[serde(default)]
    compiler: Option<RawCompiler>,
    #[serde(default)]
    external: Option<serde_json::Value>,
    #[serde(default)]
    dependencies: Vec<RawDependency>,
}

#[derive(Deserialize)]
struct RawArch {
    platform: Option<String>,
    platform_os: Option<String>,
    target: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawCompiler {
    name: String,
    version: Option<String>,
}

#[derive(Deserialize)]
struct RawDependency {
    name: String,
    hash: String,
    #[serde(default)]
    parameters: Option<RawDepParams>,
}

#[derive(Deserialize)]
struct RawDepParams {
    #[serde(default)]
    deptypes: Vec<String>,
    #[serde(default)]
    virtuals: Vec<String>,
}

/// Reads a config blob as a Spack spec image. `None` when it is not one: no `spec`, no
/// `buildcache_layout_version` or `binary_cache_checksum` (such as a `push --tag` image), or a
/// spec that does not parse.
pub fn parse_config(config: &[u8]) -> Option<SpecImage> {
    let raw: RawConfig = serde_json::from_slice(config).ok()?;
    let spec = raw.spec?;
    let layout_version = raw.buildcache_layout_version?;
    raw.binary_cache_checksum?;
    let mut parsed = Vec::with_capacity(spec.nodes.len());
    for node in &spec.nodes {
        let n: RawNode = serde_json::from_str(node.get()).ok()?;
        parsed.push((n, node.get().to_owned()));
    }
    // 1.x records the compiler as a build dependency providing the `c`/`cxx`/`fortran` virtuals;
    // 0.2x as a `compiler` key.
    // Looked up once per node: a map, so that recording a spec stays linear in its node count
    // (a search of the node list per node was quadratic: minutes for 20,000 nodes).
    let mut by_hash: HashMap<&str, &RawNode> = HashMap::with_capacity(parsed.len());
    for (n, _) in &parsed {
        by_hash.entry(n.hash.as_str()).or_insert(n);
    }
    let version_of = |hash: &str| {
        by_hash
            .get(hash)
            .map(|n| format!("{}@{}", n.name, version_text(&n.version)))
    };
    let mut nodes = Vec::with_capacity(parsed.len());
    for (n, json) in &parsed {
        let compiler = match &n.compiler {
            Some(c) => Some(match &c.version {
                Some(v) => format!("{}@{}", c.name, v),
                None => c.name.clone(),
            }),
            None => n
                .dependencies
                .iter()
                .find(|d| {
                    d.parameters
                        .as_ref()
                        .is_some_and(|p| p.virtuals.iter().any(|v| matches!(v.as_str(), "c" | "cxx" | "fortran")))
                })
                .map(|d| version_of(&d.hash).unwrap_or_else(|| d.name.clone())),
        };
        let target = n.arch.as_ref().and_then(|a| match &a.target {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o.get("name").and_then(|v| v.as_str()).map(str::to_owned),
            _ => None,
        });
        nodes.push(SpecNode {
            hash: n.hash.clone(),
            name: n.name.clone(),
            version: version_text(&n.version),
            platform: n.arch.as_ref().and_then(|a| a.platform.clone()),
            os: n.arch.as_ref().and_then(|a| a.platform_os.clone()),
            target,
            compiler,
            external: n.external.as_ref().is_some_and(|e| !e.is_null()),
            dependencies: n
                .dependencies
                .iter()
                .map(|d| {
                    let types = d.parameters.as_ref().map(|p| p.deptypes.clone()).unwrap_or_default();
                    (
                        d.hash.clone(),
                        serde_json::to_string(&types).unwrap_or_else(|_| "[]".into()),
                    )
                })
                .collect(),
            json: json.clone(),
        });
    }
    let hash = nodes.first()?.hash.clone();
    Some(SpecImage {
        hash,
        layout_version,
        nodes,
    })
}

fn version_text(v: &Option<serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_spec_config() {
        let config = br#"{"architecture":"amd64","os":"linux","spec":{"_meta":{"version":5},"nodes":[
            {"name":"libb","version":"2.1","arch":{"platform":"linux","platform_os":"debian12","target":{"name":"zen2"}},
             "dependencies":[{"name":"gcc","hash":"g","parameters":{"deptypes":["build"],"virtuals":["c","cxx"]}},
                             {"name":"liba","hash":"a","parameters":{"deptypes":["build","link"],"virtuals":[]}}],
             "hash":"b"},
            {"name":"liba","version":"1.0","arch":{"platform":"linux","platform_os":"debian12","target":"x86_64"},"hash":"a"},
            {"name":"gcc","version":"12.2.0","external":{"path":"/usr"},"hash":"g"}]},
            "buildcache_layout_version":3,"binary_cache_checksum":{"hash_algorithm":"sha256","hash":"x"}}"#;
        let img = parse_config(config).expect("a spec image");
        assert_eq!(img.hash, "b");
        assert_eq!(img.layout_version, 3);
        assert_eq!(img.nodes.len(), 3);
        let b = &img.nodes[0];
        assert_eq!(b.target.as_deref(), Some("zen2"));
        assert_eq!(b.compiler.as_deref(), Some("gcc@12.2.0"));
        assert_eq!(
            b.dependencies,
            vec![
                ("g".into(), r#"["build"]"#.into()),
                ("a".into(), r#"["build","link"]"#.into())
            ]
        );
        assert!(img.nodes[2].external);
        assert_eq!(img.nodes[1].target.as_deref(), Some("x86_64"));
        assert!(b.json.starts_with("{\"name\":\"libb\""));
    }

    #[test]
    fn rejects_configs_without_a_spec() {
        assert!(parse_config(br#"{"architecture":"amd64","os":"linux"}"#).is_none());
        assert!(parse_config(br#"{"spec":{"nodes":[]},"buildcache_layout_version":3}"#).is_none());
        assert!(parse_config(b"not json").is_none());
    }
}
