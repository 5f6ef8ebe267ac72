//! Immutable tags: `[[immutable_tags]]` rules that keep a tag from moving to another manifest
//! or being deleted, and the `overwrite` action that lets an identity do it anyway.
//!
//! ```toml
//! [[immutable_tags]]
//! repositories = ["prod/**", "spack/*"]   # as in [[auth.rules]]
//! tags = ["v*", "*.spack"]                # `*` is any run of characters; default ["*"]
//! ```
//!
//! A tag that any rule covers (its repository matches one of the rule's repository patterns and
//! its name one of the rule's tag patterns) is immutable once it exists:
//! - a manifest PUT that would move it to a different digest is refused with 403 `DENIED`, whose
//!   message names the tag, the repository and the rule; a PUT of the digest it already names
//!   succeeds (docker and `spack buildcache push --force` re-push unchanged images), and so does
//!   the PUT that creates it;
//! - DELETE by tag is refused the same way, and so is DELETE of a manifest by digest while an
//!   immutable tag names it (it would delete the tag with it) or names an index that lists it,
//!   at any depth (the tagged image would lose a platform).
//!
//! The check runs inside the catalog write transaction that moves or deletes the tag
//! (`catalog::queries`), never as a read before it, so it cannot race: of two PUTs of different
//! digests to a new immutable tag, exactly one creates it and the other is refused.
//!
//! **Who may overwrite.** An identity with the `overwrite` action on the repository moves and
//! deletes immutable tags like any other; each such write is logged at info with the user. Admins
//! have it, as they have every action; other users get it from an `[[auth.rules]]` entry, and an
//! API token only if its scopes name it too (`prod/**:pull,push,overwrite`). A registry token
//! (the docker token flow) carries it when it was asked for, and also wherever `push` was
//! granted and the identity has `overwrite`: no client asks for an action it does not know, and a
//! docker user allowed to overwrite could otherwise never do it. With authentication off
//! (`auth.enabled = false`) nobody has it: the rules hold for every client.
//!
//! A Spack build cache's `index.spack` is never immutable: the server builds that index and
//! never serves a pushed one (`spack`), and Spack pushes a new one after every change
//! (`spack buildcache update-index`), which a rule covering every tag would otherwise refuse.

use serde::{Deserialize, Serialize};

use super::scope::{Pattern, TagPattern};

/// One `[[immutable_tags]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImmutableTagRule {
    /// Repository patterns the rule covers (`*` within a component, `**` across them).
    pub repositories: Vec<Pattern>,
    /// Tag patterns (`*` matches any run of characters). Default: every tag.
    #[serde(default = "every_tag")]
    pub tags: Vec<TagPattern>,
}

fn every_tag() -> Vec<TagPattern> {
    vec![TagPattern::any()]
}

impl ImmutableTagRule {
    fn covers(&self, repo: &str) -> bool {
        self.repositories.iter().any(|p| p.matches(repo))
    }

    fn covers_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|p| p.matches(tag))
    }
}

/// Every configured rule, resolved.
#[derive(Debug, Clone, Default)]
pub struct ImmutableTags {
    rules: Vec<ImmutableTagRule>,
}

impl ImmutableTags {
    pub fn new(rules: Vec<ImmutableTagRule>) -> ImmutableTags {
        ImmutableTags { rules }
    }

    /// Checks the rules as configured: each needs a repository pattern and a tag pattern (tag
    /// patterns are checked as they are read).
    pub fn validate(rules: &[ImmutableTagRule]) -> Result<(), String> {
        for (i, rule) in rules.iter().enumerate() {
            let n = i + 1;
            if rule.repositories.is_empty() || rule.repositories.iter().any(|p| p.as_str().is_empty()) {
                return Err(format!(
                    "immutable_tags rule {n}: `repositories` needs one or more non-empty repository patterns"
                ));
            }
            if rule.tags.is_empty() {
                return Err(format!(
                    "immutable_tags rule {n}: `tags` needs one or more tag patterns (leave it out for every tag)"
                ));
            }
        }
        Ok(())
    }

    /// The rules that cover repository `repo`, for a write by someone who may (`overwrite`) or
    /// may not overwrite immutable tags.
    pub fn for_repo(&self, repo: &str, overwrite: Overwrite) -> TagLocks {
        TagLocks {
            repo: repo.to_owned(),
            rules: self
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.covers(repo))
                .map(|(i, r)| (i + 1, r.clone()))
                .collect(),
            overwrite,
        }
    }
}

/// Whether a writer may overwrite immutable tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overwrite {
    Refused,
    /// Allowed; `by` names the identity, for the log.
    Allowed {
        by: String,
    },
}

/// What a write would do to an immutable tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagChange {
    /// Point it at another manifest (this digest).
    Move { to: String },
    /// Delete it.
    Delete,
    /// Delete the manifest (this digest) it names, or that an index it names lists (`via`,
    /// that index).
    DeleteManifest { digest: String, via: Option<String> },
}

/// The immutable-tag rules of one repository, and whether this writer may overwrite them:
/// what the catalog checks each tag write against, inside the write's transaction.
#[derive(Debug, Clone)]
pub struct TagLocks {
    repo: String,
    /// (1-based rule number, rule).
    rules: Vec<(usize, ImmutableTagRule)>,
    overwrite: Overwrite,
}

/// An immutable tag that was moved or deleted by a writer with `overwrite`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overwritten {
    pub tag: String,
    pub rule: String,
    pub by: String,
}

impl TagLocks {
    /// No tag of the repository is immutable.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a rule makes `tag` immutable (for callers that skip such tags, e.g. retention).
    pub fn is_immutable(&self, tag: &str) -> bool {
        self.rule_for(tag).is_some()
    }

    /// The first rule that makes `tag` immutable, described for people.
    fn rule_for(&self, tag: &str) -> Option<String> {
        if tag == crate::spack::INDEX_TAG {
            return None;
        }
        self.rules.iter().find(|(_, r)| r.covers_tag(tag)).map(|(n, r)| {
            let repos: Vec<&str> = r.repositories.iter().map(Pattern::as_str).collect();
            let tags: Vec<&str> = r.tags.iter().map(TagPattern::as_str).collect();
            format!(
                "immutable_tags rule {n}: tags {} in repositories {}",
                tags.join(", "),
                repos.join(", ")
            )
        })
    }

    /// Checks a write that would `change` the existing tag `tag`: `Ok(None)` when the tag is
    /// mutable, `Ok(Some(_))` when it is immutable and the writer may overwrite it (the caller
    /// logs that), a refusal otherwise.
    pub fn check(&self, tag: &str, change: TagChange) -> Result<Option<Overwritten>, ImmutableTagRefusal> {
        let Some(rule) = self.rule_for(tag) else {
            return Ok(None);
        };
        match &self.overwrite {
            Overwrite::Allowed { by } => Ok(Some(Overwritten {
                tag: tag.to_owned(),
                rule,
                by: by.clone(),
            })),
            Overwrite::Refused => Err(ImmutableTagRefusal {
                repo: self.repo.clone(),
                tag: tag.to_owned(),
                rule,
                change,
            }),
        }
    }
}

/// A write refused because it would move or delete an immutable tag (403 `DENIED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImmutableTagRefusal {
    pub repo: String,
    pub tag: String,
    /// The rule, described (`immutable_tags rule 1: tags v* in repositories prod/**`).
    pub rule: String,
    pub change: TagChange,
}

impl std::fmt::Display for ImmutableTagRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ImmutableTagRefusal {
            repo,
            tag,
            rule,
            change,
        } = self;
        let what = match change {
            TagChange::Move { to } => format!("it cannot be moved to {to}"),
            TagChange::Delete => "it cannot be deleted".to_owned(),
            TagChange::DeleteManifest { digest, via: None } => {
                format!("manifest {digest}, which it names, cannot be deleted")
            }
            TagChange::DeleteManifest {
                digest,
                via: Some(index),
            } => {
                format!("manifest {digest}, which the index {index} it names lists, cannot be deleted")
            }
        };
        write!(
            f,
            "tag {tag} in repository {repo} is immutable ({rule}); {what} without the overwrite action"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(repos: &[&str], tags: &[&str]) -> ImmutableTagRule {
        ImmutableTagRule {
            repositories: repos.iter().map(|r| Pattern::new(*r)).collect(),
            tags: tags.iter().map(|t| TagPattern::parse(t).unwrap()).collect(),
        }
    }

    #[test]
    fn rules_cover_their_repositories_and_tags_only() {
        let all = ImmutableTags::new(vec![rule(&["prod/**"], &["v*"]), rule(&["spack/*"], &["*"])]);
        let locks = all.for_repo("prod/app", Overwrite::Refused);
        let refused = locks.check("v1", TagChange::Delete).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "tag v1 in repository prod/app is immutable (immutable_tags rule 1: tags v* in repositories prod/**); \
             it cannot be deleted without the overwrite action"
        );
        assert_eq!(locks.check("latest", TagChange::Delete), Ok(None));
        let spack = all.for_repo("spack/cache", Overwrite::Refused);
        let refused = spack
            .check("x.spack", TagChange::Move { to: "sha256:ab".into() })
            .unwrap_err();
        assert!(refused.to_string().contains("immutable_tags rule 2"), "{refused}");
        assert!(
            refused.to_string().contains("it cannot be moved to sha256:ab"),
            "{refused}"
        );
        assert_eq!(spack.check("index.spack", TagChange::Delete), Ok(None));
        assert!(all.for_repo("dev/app", Overwrite::Refused).is_empty());
        assert!(all.for_repo("spack/a/b", Overwrite::Refused).is_empty());
    }

    #[test]
    fn overwrite_passes_and_names_who() {
        let all = ImmutableTags::new(vec![rule(&["**"], &["*"])]);
        let locks = all.for_repo("a", Overwrite::Allowed { by: "ci".into() });
        let done = locks
            .check(
                "v1",
                TagChange::DeleteManifest {
                    digest: "sha256:x".into(),
                    via: None,
                },
            )
            .unwrap()
            .unwrap();
        assert_eq!((done.tag.as_str(), done.by.as_str()), ("v1", "ci"));
        let refused = all
            .for_repo("a", Overwrite::Refused)
            .check(
                "v1",
                TagChange::DeleteManifest {
                    digest: "sha256:child".into(),
                    via: Some("sha256:index".into()),
                },
            )
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .ends_with("manifest sha256:child, which the index sha256:index it names lists, cannot be deleted without the overwrite action"),
            "{refused}"
        );
        assert!(all.for_repo("a", Overwrite::Refused).is_immutable("v1"));
    }

    #[test]
    fn validation_and_defaults() {
        let parsed: ImmutableTagRule = toml::from_str("repositories = [\"a/**\"]").unwrap();
        assert_eq!(parsed.tags, every_tag());
        assert!(ImmutableTags::validate(&[parsed]).is_ok());
        let err = ImmutableTags::validate(&[rule(&[], &["*"])]).unwrap_err();
        assert!(
            err.contains("immutable_tags rule 1") && err.contains("repositories"),
            "{err}"
        );
        let err = ImmutableTags::validate(&[rule(&["a"], &["*"]), rule(&["a"], &[])]).unwrap_err();
        assert!(err.contains("immutable_tags rule 2") && err.contains("tags"), "{err}");
        assert!(toml::from_str::<ImmutableTagRule>("repositories = [\"a\"]\ntags = [\"a/b\"]").is_err());
        assert!(toml::from_str::<ImmutableTagRule>("repositories = [\"a\"]\ntag = [\"v*\"]").is_err());
    }
}
