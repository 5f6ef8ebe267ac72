//! The access policy: who may do what to which repositories.
//!
//! - Anonymous clients may pull from the repositories matching `auth.anonymous_pull`, and do
//!   nothing else.
//! - Admins may do everything, `overwrite` of immutable tags included.
//! - Other users may do what an `[[auth.rules]]` entry naming them (or `*`, any signed-in user)
//!   allows, plus pull what anonymous clients may. With no rule configured, the default rule
//!   lets every signed-in user pull and push everywhere; deleting and overwriting immutable
//!   tags (`auth::immutable`) are left to admins.
//! - An API token acts for its user, restricted further to the token's own scopes; but no
//!   identity gets less than an anonymous client, so any token may pull what anonymous clients
//!   may, whatever its scopes.

use serde::{Deserialize, Serialize};

use super::scope::{Action, Grant, Pattern};

/// One `[[auth.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Repository patterns the rule covers (`*` within a component, `**` across them).
    pub repositories: Vec<Pattern>,
    /// User names the rule applies to; `*` is every signed-in user.
    pub users: Vec<String>,
    /// Actions allowed: `pull`, `push`, `delete`, `overwrite` (move or delete immutable tags).
    pub actions: Vec<Action>,
}

impl Rule {
    fn applies(&self, user: &str, repo: &str, action: Action) -> bool {
        self.actions.contains(&action)
            && self.users.iter().any(|u| u == "*" || u == user)
            && self.repositories.iter().any(|p| p.matches(repo))
    }
}

/// Who is asking, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Anonymous,
    User {
        name: &'a str,
        admin: bool,
        /// The API token's scopes, when the user acts through one.
        scopes: Option<&'a [Grant]>,
    },
}

/// The resolved access policy.
#[derive(Debug, Clone)]
pub struct Policy {
    anonymous_pull: Vec<Pattern>,
    rules: Vec<Rule>,
}

impl Policy {
    /// `rules` empty means the default rule (every signed-in user may pull and push).
    pub fn new(anonymous_pull: Vec<Pattern>, rules: Vec<Rule>) -> Policy {
        let rules = if rules.is_empty() {
            vec![Rule {
                repositories: vec![Pattern::new("**")],
                users: vec!["*".into()],
                actions: vec![Action::Pull, Action::Push],
            }]
        } else {
            rules
        };
        Policy { anonymous_pull, rules }
    }

    /// Whether anonymous clients may pull `repo`.
    pub fn public(&self, repo: &str) -> bool {
        self.anonymous_pull.iter().any(|p| p.matches(repo))
    }

    /// Whether anonymous clients may pull anything at all.
    pub fn any_public(&self) -> bool {
        !self.anonymous_pull.is_empty()
    }

    /// One line saying how anonymous pull is set, for the start-up log.
    pub fn describe_anonymous(&self) -> String {
        if self.anonymous_pull.is_empty() {
            "anonymous pull is disabled: every request needs credentials".to_owned()
        } else {
            let pats: Vec<&str> = self.anonymous_pull.iter().map(Pattern::as_str).collect();
            format!("anonymous pull is allowed for {}", pats.join(", "))
        }
    }

    /// Whether `who` may do `action` on `repo`.
    pub fn allows(&self, who: Subject<'_>, repo: &str, action: Action) -> bool {
        match who {
            Subject::Anonymous => action == Action::Pull && self.public(repo),
            Subject::User { name, admin, scopes } => {
                if action == Action::Pull && self.public(repo) {
                    return true;
                }
                let by_role = admin || self.rules.iter().any(|r| r.applies(name, repo, action));
                by_role && scopes.is_none_or(|grants| grants.iter().any(|g| g.allows(repo, action)))
            }
        }
    }

    /// The subset of `wanted` that `who` may do on `repo`.
    pub fn allowed_actions(&self, who: Subject<'_>, repo: &str, wanted: &[Action]) -> Vec<Action> {
        wanted.iter().copied().filter(|a| self.allows(who, repo, *a)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Subject<'_> {
        Subject::User {
            name,
            admin: false,
            scopes: None,
        }
    }

    #[test]
    fn default_policy() {
        let p = Policy::new(vec![], vec![]);
        assert!(!p.allows(Subject::Anonymous, "a", Action::Pull));
        assert!(p.allows(user("u"), "a/b", Action::Push));
        assert!(!p.allows(user("u"), "a/b", Action::Delete));
        let admin = Subject::User {
            name: "root",
            admin: true,
            scopes: None,
        };
        assert!(p.allows(admin, "a/b", Action::Delete));
        assert!(p.allows(admin, "a/b", Action::Overwrite));
        assert!(!p.allows(user("u"), "a/b", Action::Overwrite));
    }

    #[test]
    fn overwrite_is_granted_by_rules_and_narrowed_by_token_scopes() {
        let p = Policy::new(
            vec![],
            vec![Rule {
                repositories: vec![Pattern::new("prod/**")],
                users: vec!["release".into()],
                actions: vec![Action::Pull, Action::Push, Action::Overwrite],
            }],
        );
        assert!(p.allows(user("release"), "prod/app", Action::Overwrite));
        assert!(!p.allows(user("release"), "dev/app", Action::Overwrite));
        assert!(!p.allows(user("other"), "prod/app", Action::Overwrite));
        let push_only = [Grant::parse("prod/**:pull,push").unwrap()];
        let token = |scopes| Subject::User {
            name: "release",
            admin: false,
            scopes: Some(scopes),
        };
        assert!(!p.allows(token(&push_only), "prod/app", Action::Overwrite));
        let with_overwrite = [Grant::parse("prod/**:push,overwrite").unwrap()];
        assert!(p.allows(token(&with_overwrite), "prod/app", Action::Overwrite));
    }

    #[test]
    fn rules_public_and_token_scopes() {
        let p = Policy::new(
            vec![Pattern::new("public/**")],
            vec![
                Rule {
                    repositories: vec![Pattern::new("**")],
                    users: vec!["*".into()],
                    actions: vec![Action::Pull],
                },
                Rule {
                    repositories: vec![Pattern::new("team/*")],
                    users: vec!["ci".into()],
                    actions: vec![Action::Pull, Action::Push],
                },
            ],
        );
        assert!(p.allows(Subject::Anonymous, "public/x", Action::Pull));
        assert!(!p.allows(Subject::Anonymous, "public/x", Action::Push));
        assert!(!p.allows(Subject::Anonymous, "team/x", Action::Pull));
        assert!(p.allows(user("bob"), "team/x", Action::Pull));
        assert!(!p.allows(user("bob"), "team/x", Action::Push));
        assert!(p.allows(user("ci"), "team/x", Action::Push));
        let scopes = [Grant::parse("team/x:pull").unwrap()];
        let token = Subject::User {
            name: "ci",
            admin: false,
            scopes: Some(&scopes),
        };
        assert!(p.allows(token, "team/x", Action::Pull));
        assert!(!p.allows(token, "team/x", Action::Push));
        assert!(!p.allows(token, "team/y", Action::Pull));
        // A token scoped elsewhere still pulls what anonymous clients may, and no more.
        assert!(p.allows(token, "public/x", Action::Pull));
        assert!(!p.allows(token, "public/x", Action::Push));
        assert_eq!(
            p.allowed_actions(user("ci"), "team/y", &Action::ALL),
            vec![Action::Pull, Action::Push]
        );
    }
}
