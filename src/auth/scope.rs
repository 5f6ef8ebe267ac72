//! Actions, repository patterns and the token scopes clients ask for.
//!
//! A scope, as docker and every OCI client send it to the token endpoint and as the registry puts
//! it in a challenge: `repository:<name>:<action>[,<action>…]`, plus `registry:catalog:*`. The
//! actions Stowage knows are `pull`, `push`, `delete` and `overwrite` (moving or deleting a tag
//! that an `[[immutable_tags]]` rule protects; see `auth::immutable`); `*` means all four.
//! Unknown actions are ignored (never granted, never an error), as the token protocol asks.
//!
//! Repository patterns (policy rules, API token scopes) are globs over repository names: `*`
//! matches within one path component, `**` matches any number of components, so `spack/*`
//! matches `spack/cache` but not `spack/a/b`, and `spack/**` matches both (and `spack` itself).
//! Tag patterns ([`TagPattern`]) are globs over tag names where `*` matches any run of
//! characters: `v*` matches `v1` and `v1.2.3`.

use serde::{Deserialize, Serialize};

/// What a request does to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    Delete,
    /// Move or delete a tag that an `[[immutable_tags]]` rule protects.
    Overwrite,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Pull, Action::Push, Action::Delete, Action::Overwrite];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Overwrite => "overwrite",
        }
    }

    /// Parses one action; `*` is all of them. Unknown words give nothing.
    pub fn parse_list(s: &str) -> Vec<Action> {
        let mut out = Vec::new();
        for word in s.split(',').map(str::trim) {
            let add: &[Action] = match word {
                "pull" => &[Action::Pull],
                "push" => &[Action::Push],
                "delete" => &[Action::Delete],
                "overwrite" => &[Action::Overwrite],
                "*" => &Action::ALL,
                _ => &[],
            };
            for a in add {
                if !out.contains(a) {
                    out.push(*a);
                }
            }
        }
        out.sort();
        out
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One scope of a token request or a challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `repository:<name>:<actions>`.
    Repository { name: String, actions: Vec<Action> },
    /// `registry:catalog:*`: listing repositories.
    Catalog,
}

impl Scope {
    /// Parses one scope string; `None` for anything Stowage does not grant (unknown resource
    /// types, malformed strings), which the token endpoint skips.
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        // The name may itself hold ':' only in a registry-qualified form; OCI names never do, so
        // the actions are after the last ':'.
        let (name, actions) = rest.rsplit_once(':')?;
        match kind {
            // `repository(plugin):name` is a docker-ism for resource classes; the class is ignored.
            k if k == "repository" || k.starts_with("repository(") => {
                if name.is_empty() {
                    return None;
                }
                Some(Scope::Repository {
                    name: name.to_owned(),
                    actions: Action::parse_list(actions),
                })
            }
            "registry" if name == "catalog" => Some(Scope::Catalog),
            _ => None,
        }
    }

    /// Every scope in a token request: `scope` may repeat and each value may hold several
    /// scopes separated by spaces (OAuth2 style).
    pub fn parse_all<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Scope> {
        values
            .into_iter()
            .flat_map(|v| v.split(' '))
            .filter(|s| !s.is_empty())
            .filter_map(Scope::parse)
            .collect()
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Repository { name, actions } => {
                let actions: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
                write!(f, "repository:{name}:{}", actions.join(","))
            }
            Scope::Catalog => f.write_str("registry:catalog:*"),
        }
    }
}

/// A repository name glob (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(s: impl Into<String>) -> Pattern {
        Pattern(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let pat: Vec<&str> = self.0.split('/').collect();
        let name: Vec<&str> = name.split('/').collect();
        match_components(&pat, &name)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn match_components(pat: &[&str], name: &[&str]) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some((&"**", rest)) => (0..=name.len()).any(|skip| match_components(rest, &name[skip..])),
        Some((p, rest)) => match name.split_first() {
            Some((n, name_rest)) => match_glob(p.as_bytes(), n.as_bytes()) && match_components(rest, name_rest),
            None => false,
        },
    }
}

/// `*` within one component.
fn match_glob(p: &[u8], n: &[u8]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((b'*', rest)) => (0..=n.len()).any(|skip| match_glob(rest, &n[skip..])),
        Some((c, rest)) => n
            .split_first()
            .is_some_and(|(d, n_rest)| c == d && match_glob(rest, n_rest)),
    }
}

/// A tag name glob: `*` matches any run of characters (tags hold no `/`); anything else
/// matches itself. Checked by [`TagPattern::parse`] to be made of tag characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TagPattern(String);

impl TagPattern {
    /// Longest pattern accepted: a tag is at most 128 characters, and a few `*` besides.
    const MAX_LEN: usize = 256;

    /// A pattern of tag characters (`A-Z a-z 0-9 _ . -`) and `*`.
    pub fn parse(s: &str) -> Result<TagPattern, String> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(format!(
                "tag pattern {s:?} must be 1 to {} characters long",
                Self::MAX_LEN
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '*')))
        {
            return Err(format!(
                "tag pattern {s:?} holds {c:?}: only tag characters (A-Z a-z 0-9 _ . -) and * may appear"
            ));
        }
        Ok(TagPattern(s.to_owned()))
    }

    /// `*`: every tag.
    pub fn any() -> TagPattern {
        TagPattern("*".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether tag `name` matches. Linear backtracking over the last `*` only, so a pattern of
    /// many stars costs O(pattern × tag) on a client's tag, never more.
    pub fn matches(&self, name: &str) -> bool {
        let (p, n) = (self.0.as_bytes(), name.as_bytes());
        let (mut pi, mut ni) = (0, 0);
        // Where the last `*` was, and the name position it currently stands for up to.
        let mut star: Option<(usize, usize)> = None;
        while ni < n.len() {
            if pi < p.len() && p[pi] == b'*' {
                star = Some((pi, ni));
                pi += 1;
            } else if pi < p.len() && p[pi] == n[ni] {
                pi += 1;
                ni += 1;
            } else if let Some((sp, sn)) = star {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

impl TryFrom<String> for TagPattern {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        TagPattern::parse(&s)
    }
}

impl From<TagPattern> for String {
    fn from(p: TagPattern) -> String {
        p.0
    }
}

impl std::fmt::Display for TagPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pattern with the actions it allows: an API token's scope (`spack/**:pull,push`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub repositories: Pattern,
    pub actions: Vec<Action>,
}

impl Grant {
    /// Parses `<pattern>:<actions>`, as `stowage token create --scope` takes it.
    pub fn parse(s: &str) -> Result<Grant, String> {
        let (pattern, actions) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("scope {s:?} is not <repository pattern>:<actions>"))?;
        let actions = Action::parse_list(actions);
        if pattern.is_empty() || actions.is_empty() {
            return Err(format!(
                "scope {s:?}: needs a repository pattern and one or more of pull, push, delete, overwrite"
            ));
        }
        Ok(Grant {
            repositories: Pattern::new(pattern),
            actions,
        })
    }

    pub fn allows(&self, repo: &str, action: Action) -> bool {
        self.actions.contains(&action) && self.repositories.matches(repo)
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let actions: Vec<&str> = self.actions.iter().map(|a| a.as_str()).collect();
        write!(f, "{}:{}", self.repositories, actions.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = Pattern::new("spack/*");
        assert!(p.matches("spack/cache"));
        assert!(!p.matches("spack/a/b"));
        assert!(!p.matches("spack"));
        let p = Pattern::new("spack/**");
        assert!(p.matches("spack/cache") && p.matches("spack/a/b") && p.matches("spack"));
        assert!(!p.matches("spackx/a"));
        assert!(Pattern::new("**").matches("a/b/c"));
        assert!(Pattern::new("lib*/x").matches("library/x"));
        assert!(!Pattern::new("lib*/x").matches("library/y"));
        assert!(Pattern::new("exact").matches("exact") && !Pattern::new("exact").matches("exact2"));
    }

    #[test]
    fn scopes() {
        assert_eq!(
            Scope::parse("repository:spack/cache:pull,push"),
            Some(Scope::Repository {
                name: "spack/cache".into(),
                actions: vec![Action::Pull, Action::Push]
            })
        );
        assert_eq!(
            Scope::parse("repository:a:*"),
            Some(Scope::Repository {
                name: "a".into(),
                actions: Action::ALL.to_vec()
            })
        );
        assert_eq!(Scope::parse("registry:catalog:*"), Some(Scope::Catalog));
        assert_eq!(Scope::parse("garbage"), None);
        assert_eq!(
            Scope::parse("repository:a:bogus"),
            Some(Scope::Repository {
                name: "a".into(),
                actions: vec![]
            })
        );
        let all = Scope::parse_all(["repository:a:pull repository:b:push", "registry:catalog:*"]);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].to_string(), "repository:a:pull");
    }

    #[test]
    fn grants() {
        let g = Grant::parse("spack/**:pull,push").unwrap();
        assert!(g.allows("spack/x", Action::Push));
        assert!(!g.allows("spack/x", Action::Delete));
        assert!(!g.allows("other", Action::Pull));
        assert!(Grant::parse("nope").is_err());
        assert!(Grant::parse("a:bogus").is_err());
        let g = Grant::parse("prod/**:push,overwrite").unwrap();
        assert!(g.allows("prod/app", Action::Overwrite));
        assert_eq!(g.to_string(), "prod/**:push,overwrite");
        assert_eq!(Grant::parse("a:*").unwrap().actions, Action::ALL.to_vec());
    }

    #[test]
    fn tag_patterns() {
        let p = TagPattern::parse("v*").unwrap();
        assert!(p.matches("v1") && p.matches("v1.2.3") && p.matches("v"));
        assert!(!p.matches("latest") && !p.matches("xv1"));
        let p = TagPattern::parse("*.spack").unwrap();
        assert!(p.matches("gcc-12.3.0-abcdef.spack") && !p.matches("index.spackx"));
        assert!(TagPattern::parse("*").unwrap().matches("anything"));
        assert!(
            TagPattern::parse("release-*-final")
                .unwrap()
                .matches("release-1.0-final")
        );
        for bad in ["", "a/b", "v 1", "v?", "é"] {
            assert!(TagPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(TagPattern::parse(&"a".repeat(257)).is_err());
        // Many stars against a long tag that almost matches: answered at once.
        let p = TagPattern::parse(&format!("{}b", "*a".repeat(60))).unwrap();
        assert!(!p.matches(&"a".repeat(128)));
        assert!(p.matches(&format!("{}b", "a".repeat(127))));
    }
}
