//! Retention: which tags the configured rules delete, Spack keep-lists, and last-pulled times.
//!
//! **Rules** (`[[gc.retention]]`, [`RetentionRule`]) are evaluated by every collection pass
//! before it collects manifests and blobs ([`Registry::apply_retention`]), and by
//! `stowage spack prune --dry-run` ([`plan`] with [`Mode::Preview`]): the same code decides in
//! both, so the preview lists what the pass then deletes, given the same catalog and clock.
//!
//! - The first rule whose `repositories` match a repository applies to it; a repository no
//!   rule matches is never touched.
//! - In that repository each tag is deleted unless something keeps it: it is among the
//!   `keep_last` most recently pushed (`tags.updated_at`, ties broken by name), was pushed
//!   within `keep_pushed_within`, its manifest was pulled within `keep_pulled_within`, its name
//!   matches a `keep_tags` glob, or it is a Spack spec tag whose hash a live keep-list keeps.
//! - Only tags are deleted. The manifest a deleted tag named is then untagged and the
//!   collector's untagged-manifest collection removes it, and then its blobs, after the grace
//!   period. A Spack repository's index (`index.spack`) is the server's, not a tag: it is never
//!   considered, nor is a client-pushed tag of that name.
//! - A tag pushed after the pass planned its repository (or in that same second) is left for
//!   the next pass.
//! - A rule with `dry_run = true` only logs what it would delete. Every real deletion is
//!   logged at info with the repository, tag, digest and rule.
//!
//! **Keep-lists** name spec DAG hashes (or the roots of a `spack.lock`) of a Spack build cache
//! with an expiry. A live keep-list keeps its specs and their whole link/run dependency closure
//! (edges of `spack_deps` whose deptypes include `link` or `run`, followed transitively), so a
//! kept environment still installs. Build-only dependencies are not kept. Expired keep-lists
//! stop counting at once and are removed by the next pass.
//!
//! **Bounded work.** A pass reads each repository on the catalog's reader connections in pages
//! of [`BATCH`] tags and deletes each page's decisions in short write jobs of at most
//! [`DELETE_CHUNK`] tags, each of which re-checks
//! every condition it can inside the transaction: the tag still names the same manifest and was
//! not pushed again, its manifest was not pulled since the cutoff, it still has `keep_last`
//! newer tags. Spec tags are deleted only while the repository's spec tags are as planned (the
//! Spack index generation, bumped by every spec tag change, is as expected) and no keep-list was
//! created or replaced since the plan; otherwise the repository is planned again (at most
//! [`REPLANS`] times per pass; what remains waits for the next pass).
//!
//! **Last-pulled times** (`manifests.pulled_at`) are recorded lazily: a manifest GET or HEAD
//! adds `(repository, digest)` to an in-memory map ([`PullRecorder::record`]: one short mutex
//! hold and a hash lookup, no I/O), skipped when this process wrote that manifest's time within
//! the last [`RECENT_SECS`]. The server flushes the map every [`FLUSH_EVERY`], at graceful stop,
//! and at the start of each collection pass, in write jobs of at most `PULL_BATCH` updates that
//! skip rows whose stored time is already within [`RECENT_SECS`]. Times are thus accurate to
//! about an hour; a crash loses at most the last minute of pulls.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::Registry;
use crate::catalog::{Catalog, RetentionSnapshot, RetentionTag, TagRemoval};
use crate::config::RetentionRule;
use crate::error::Result;
use crate::oci::RepoName;

/// Tags read and decided per step.
pub const BATCH: usize = 500;
/// Tags deleted per write job: a spec tag's deletion also removes its closure rows (one per
/// node of its DAG), so this keeps each job to a few milliseconds of writer time.
const DELETE_CHUNK: usize = 100;
/// Repositories listed per catalog query.
const REPO_PAGE: u64 = 500;
/// Plans of one repository per pass when its spec tags keep changing under the pass.
const REPLANS: usize = 3;
/// A pulled-at time this recent is not written again.
pub const RECENT_SECS: i64 = 3600;
/// How often the server flushes recorded pulls.
pub const FLUSH_EVERY: Duration = Duration::from_secs(60);
/// Most `(repository, digest)` pairs remembered as recently written; beyond it the memory is
/// cleared (costing a few redundant, filtered updates).
const MAX_RECENT: usize = 200_000;
/// Keep-lists removed per write job once expired.
const EXPIRED_BATCH: usize = 500;

/// Whether a plan deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The collector: delete what rules without `dry_run` decide, log the rest.
    Apply,
    /// `stowage spack prune --dry-run`: delete nothing, report everything.
    Preview,
}

/// A tag a rule deletes (or, in a dry run, would delete).
#[derive(Debug, Clone)]
pub struct Removal {
    pub repo: String,
    pub tag: String,
    pub digest: String,
    /// 1-based index of the rule in `gc.retention`.
    pub rule: usize,
    /// Why nothing kept it.
    pub why: String,
    /// Not deleted: a preview, or a `dry_run` rule.
    pub dry_run: bool,
}

/// What a plan did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Tags deleted.
    pub deleted: u64,
    /// Tags a dry run (or a preview) would delete.
    pub would_delete: u64,
    /// Repositories left (partly) for the next pass because their spec tags kept changing.
    pub deferred: u64,
}

/// The rule that applies to `repo`: the first whose patterns match, with its 1-based index.
pub fn rule_for<'a>(rules: &'a [RetentionRule], repo: &str) -> Option<(usize, &'a RetentionRule)> {
    rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.repositories.iter().any(|p| p.matches(repo)))
        .map(|(i, r)| (i + 1, r))
}

/// Why `rule` deletes `tag`, or `None` when something keeps it.
fn decide(rule: &RetentionRule, snapshot: &RetentionSnapshot, tag: &RetentionTag, now: i64) -> Option<String> {
    // A tag pushed since the plan began (or in its first second) is left for the next pass:
    // `newest` could not count it.
    if tag.name == crate::spack::INDEX_TAG || tag.updated_at >= snapshot.taken_at || snapshot.newest.contains(&tag.name)
    {
        return None;
    }
    let within = |at: Option<i64>, period: Option<crate::config::Period>| match (at, period) {
        (Some(at), Some(p)) => at >= now.saturating_sub(i64::try_from(p.secs()).unwrap_or(i64::MAX)),
        _ => false,
    };
    if within(Some(tag.updated_at), rule.keep_pushed_within) || within(tag.pulled_at, rule.keep_pulled_within) {
        return None;
    }
    if rule.keep_tags.iter().any(|p| p.matches(&tag.name)) {
        return None;
    }
    if tag
        .spack_hash
        .as_ref()
        .is_some_and(|h| snapshot.kept_hashes.contains(h))
    {
        return None;
    }
    let mut why = Vec::new();
    if let Some(n) = rule.keep_last {
        why.push(format!("not among the last {n} pushed"));
    }
    if let Some(p) = rule.keep_pushed_within {
        why.push(format!("pushed {} ago (> {p})", age(now - tag.updated_at)));
    }
    if let Some(p) = rule.keep_pulled_within {
        match tag.pulled_at {
            Some(at) => why.push(format!("pulled {} ago (> {p})", age(now - at))),
            None => why.push("never pulled".to_owned()),
        }
    }
    if !rule.keep_tags.is_empty() {
        why.push("matches no keep_tags".to_owned());
    }
    if tag.spack_hash.is_some() {
        why.push("in no keep-list".to_owned());
    }
    Some(why.join("; "))
}

/// A coarse age for messages: `3d`, `5h`, `12m`, `40s`.
fn age(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Evaluates `rules` over every repository (or only `only`), deleting in [`Mode::Apply`], and
/// calls `seen` with each removal decided (deleted, or not deleted in a dry run). A repository
/// that fails is logged and skipped; the rest go on.
pub async fn plan(
    catalog: &Catalog,
    rules: &[RetentionRule],
    immutable: &crate::auth::ImmutableTags,
    only: Option<&RepoName>,
    mode: Mode,
    mut seen: impl FnMut(&Removal),
) -> Result<RetentionReport> {
    let mut report = RetentionReport::default();
    if rules.is_empty() {
        return Ok(report);
    }
    if let Some(repo) = only {
        if let Some((index, rule)) = rule_for(rules, repo.as_str()) {
            plan_repo(catalog, repo, (index, rule), immutable, mode, &mut seen, &mut report).await?;
        }
        return Ok(report);
    }
    let mut after: Option<String> = None;
    loop {
        let matcher: Vec<RetentionRule> = rules.to_vec();
        let page = catalog
            .visible_repositories(after.clone(), REPO_PAGE, REPO_PAGE, move |name| {
                rule_for(&matcher, name).is_some()
            })
            .await?;
        for name in &page.names {
            let Ok(repo) = name.parse::<RepoName>() else { continue };
            let Some((index, rule)) = rule_for(rules, name) else {
                continue;
            };
            if let Err(e) = plan_repo(catalog, &repo, (index, rule), immutable, mode, &mut seen, &mut report).await {
                tracing::warn!(repo = %name, error = %e, "retention: this repository failed; the next pass retries it");
            }
        }
        after = match (page.resume_after, page.names.last()) {
            (Some(resume), _) => Some(resume),
            (None, Some(last)) if page.names.len() as u64 >= REPO_PAGE => Some(last.clone()),
            _ => break,
        };
    }
    Ok(report)
}

async fn plan_repo(
    catalog: &Catalog,
    repo: &RepoName,
    (index, rule): (usize, &RetentionRule),
    immutable: &crate::auth::ImmutableTags,
    mode: Mode,
    seen: &mut impl FnMut(&Removal),
    report: &mut RetentionReport,
) -> Result<()> {
    let deletes = mode == Mode::Apply && !rule.dry_run;
    // Immutable tags are never retention's to delete (the rule that made them so says keep).
    let locks = immutable.for_repo(repo.as_str(), crate::auth::Overwrite::Refused);
    for attempt in 1..=REPLANS {
        let now = crate::catalog::now();
        let Some(snapshot) = catalog.retention_snapshot(repo, rule.keep_last, now).await? else {
            return Ok(());
        };
        let pulled_since = rule
            .keep_pulled_within
            .map(|p| now.saturating_sub(i64::try_from(p.secs()).unwrap_or(i64::MAX)));
        let mut expected_generation = snapshot.spack_generation;
        let mut spack_stale = false;
        let mut after: Option<String> = None;
        loop {
            let tags = catalog.retention_tags(snapshot.repo_id, after.clone(), BATCH).await?;
            let Some(last) = tags.last() else { break };
            after = Some(last.name.clone());
            let decided: Vec<(&RetentionTag, String)> = tags
                .iter()
                .filter(|t| !locks.is_immutable(&t.name))
                .filter_map(|t| decide(rule, &snapshot, t, now).map(|why| (t, why)))
                .filter(|(t, _)| !(spack_stale && t.spack_hash.is_some()))
                .collect();
            let removal = |t: &RetentionTag, why: &str, dry_run: bool| Removal {
                repo: repo.to_string(),
                tag: t.name.clone(),
                digest: t.digest.clone(),
                rule: index,
                why: why.to_owned(),
                dry_run,
            };
            if !deletes {
                for (t, why) in &decided {
                    let r = removal(t, why, true);
                    if mode == Mode::Apply {
                        tracing::info!(repo = %r.repo, tag = %r.tag, digest = %r.digest, rule = index, why = %r.why,
                            "retention (dry run): would delete tag");
                    }
                    seen(&r);
                    report.would_delete += 1;
                }
            } else {
                for chunk in decided.chunks(DELETE_CHUNK) {
                    let chunk: Vec<&(&RetentionTag, String)> = chunk
                        .iter()
                        .filter(|(t, _)| !(spack_stale && t.spack_hash.is_some()))
                        .collect();
                    if chunk.is_empty() {
                        continue;
                    }
                    let removals = chunk
                        .iter()
                        .map(|(t, why)| TagRemoval {
                            name: t.name.clone(),
                            manifest_id: t.manifest_id,
                            updated_at: t.updated_at,
                            spack: t.spack_hash.is_some(),
                            digest: t.digest.clone(),
                            reason: format!("rule {index}: {why}"),
                        })
                        .collect();
                    let done = catalog
                        .retention_delete(
                            snapshot.repo_id,
                            snapshot.taken_at,
                            expected_generation,
                            removals,
                            pulled_since,
                            rule.keep_last,
                        )
                        .await?;
                    let deleted: std::collections::HashSet<&str> = done.deleted.iter().map(String::as_str).collect();
                    for (t, why) in chunk.iter().filter(|(t, _)| deleted.contains(t.name.as_str())) {
                        let r = removal(t, why, false);
                        tracing::info!(repo = %r.repo, tag = %r.tag, digest = %r.digest, rule = index, why = %r.why,
                            "retention: deleted tag");
                        seen(&r);
                        report.deleted += 1;
                    }
                    if done.spack_changed {
                        spack_stale = true;
                    } else {
                        expected_generation = done.spack_generation;
                    }
                }
            }
            if tags.len() < BATCH {
                break;
            }
        }
        if !spack_stale {
            return Ok(());
        }
        tracing::debug!(repo = %repo, attempt, "retention: spec tags or keep-lists changed during the pass; planning again");
    }
    report.deferred += 1;
    Ok(())
}

/// Pending last-pulled times (see the module doc).
#[derive(Debug, Default)]
pub struct PullRecorder {
    state: Mutex<PullState>,
}

#[derive(Debug, Default)]
struct PullState {
    /// `repo@digest` -> when it was pulled, not yet written.
    pending: HashMap<String, i64>,
    /// `repo@digest` -> when this process last wrote it.
    recent: HashMap<String, i64>,
}

impl PullRecorder {
    /// Notes a pull of `digest` from `repo`: no I/O, one short lock.
    pub fn record(&self, repo: &RepoName, digest: &str) {
        let now = crate::catalog::now();
        let key = format!("{repo}@{digest}");
        let Ok(mut state) = self.state.lock() else { return };
        if state.recent.get(&key).is_some_and(|&at| now - at < RECENT_SECS) {
            return;
        }
        state.pending.entry(key).or_insert(now);
    }

    /// Writes the pending pulls; returns how many rows changed. Pulls whose write failed stay
    /// pending for the next flush.
    pub async fn flush(&self, catalog: &Catalog) -> Result<u64> {
        let pending = match self.state.lock() {
            Ok(mut state) => std::mem::take(&mut state.pending),
            Err(_) => return Ok(0),
        };
        let mut batch = Vec::with_capacity(crate::catalog::PULL_BATCH.min(pending.len()));
        let mut written = 0;
        let mut items = pending.into_iter().peekable();
        while items.peek().is_some() {
            batch.clear();
            batch.extend(items.by_ref().take(crate::catalog::PULL_BATCH));
            let rows = batch
                .iter()
                .filter_map(|(key, at)| {
                    let (repo, digest) = key.split_once('@')?;
                    Some((repo.to_owned(), digest.to_owned(), *at))
                })
                .collect();
            match catalog.record_pulls(rows, RECENT_SECS).await {
                Ok(n) => {
                    written += n;
                    if let Ok(mut state) = self.state.lock() {
                        if state.recent.len() + batch.len() > MAX_RECENT {
                            state.recent.clear();
                        }
                        state.recent.extend(batch.drain(..));
                    }
                }
                Err(e) => {
                    if let Ok(mut state) = self.state.lock() {
                        for (key, at) in batch.drain(..).chain(items) {
                            state.pending.entry(key).or_insert(at);
                        }
                    }
                    return Err(e);
                }
            }
        }
        if let Ok(mut state) = self.state.lock() {
            let now = crate::catalog::now();
            state.recent.retain(|_, at| now - *at < RECENT_SECS);
        }
        Ok(written)
    }
}

impl Registry {
    /// Notes that a manifest was served (see [`PullRecorder`]).
    pub fn record_pull(&self, repo: &RepoName, digest: &str) {
        self.pulls.record(repo, digest);
    }

    /// Writes the pulls recorded since the last flush.
    pub async fn flush_pulls(&self) {
        match self.pulls.flush(&self.catalog).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(manifests = n, "recorded last-pulled times"),
            Err(e) => tracing::warn!(error = %e, "recording last-pulled times failed; retrying at the next flush"),
        }
    }

    /// The collector's retention step: flushes pulls, removes expired keep-lists, then applies
    /// the retention rules, calling `seen` with each tag it deleted. Failures are logged;
    /// collection goes on either way.
    pub async fn apply_retention(&self, mut seen: impl FnMut(&Removal) + Send) {
        self.flush_pulls().await;
        let now = crate::catalog::now();
        loop {
            match self.catalog.remove_expired_keep_lists(now, EXPIRED_BATCH).await {
                Ok(removed) => {
                    for (repo, name) in &removed {
                        tracing::info!(repo = %repo, keep_list = %name, "removed an expired Spack keep-list");
                    }
                    if removed.len() < EXPIRED_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "removing expired keep-lists failed");
                    break;
                }
            }
        }
        let rules = &self.settings.retention;
        if rules.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        match plan(
            &self.catalog,
            rules,
            &self.settings.immutable_tags,
            None,
            Mode::Apply,
            |r| {
                if !r.dry_run {
                    seen(r);
                }
            },
        )
        .await
        {
            Ok(r) if r == RetentionReport::default() => tracing::debug!("retention: nothing to delete"),
            Ok(r) => {
                crate::metrics::get().deleted("retention_tag", r.deleted);
                tracing::info!(
                    deleted = r.deleted,
                    would_delete = r.would_delete,
                    deferred_repositories = r.deferred,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "retention applied"
                )
            }
            Err(e) => tracing::warn!(error = %e, "retention failed; retrying next pass"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::auth::scope::Pattern;
    use crate::config::Period;

    fn rule(patterns: &[&str]) -> RetentionRule {
        RetentionRule {
            repositories: patterns.iter().map(|p| Pattern::new(*p)).collect(),
            keep_last: None,
            keep_pushed_within: None,
            keep_pulled_within: None,
            keep_tags: Vec::new(),
            dry_run: false,
        }
    }

    fn tag(name: &str, updated_at: i64, pulled_at: Option<i64>, spack_hash: Option<&str>) -> RetentionTag {
        RetentionTag {
            name: name.into(),
            manifest_id: 1,
            digest: "sha256:00".into(),
            updated_at,
            pulled_at,
            spack_hash: spack_hash.map(str::to_owned),
        }
    }

    fn snapshot(newest: &[&str], kept: &[&str]) -> RetentionSnapshot {
        RetentionSnapshot {
            repo_id: 1,
            spack_generation: None,
            newest: newest.iter().map(|s| s.to_string()).collect(),
            kept_hashes: kept.iter().map(|s| s.to_string()).collect::<HashSet<_>>(),
            taken_at: 1_000_000,
        }
    }

    #[tokio::test]
    async fn pulls_are_batched_and_written_once_an_hour() {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&tmp.path().join("catalog.db")).unwrap();
        catalog
            .write(|c| {
                c.execute_batch(
                    "INSERT INTO repositories (id, name, created_at) VALUES (1, 'r', 0);
                     INSERT INTO manifests (id, repo_id, digest, media_type, size, content, created_at)
                          VALUES (1, 1, 'sha256:01', 'x', 1, x'00', 0);",
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let repo: RepoName = "r".parse().unwrap();
        let pulls = PullRecorder::default();
        for _ in 0..3 {
            pulls.record(&repo, "sha256:01");
        }
        assert_eq!(pulls.flush(&catalog).await.unwrap(), 1, "three pulls, one write");
        let pulled_at: Option<i64> = catalog
            .read(|c| Ok(c.query_row("SELECT pulled_at FROM manifests WHERE id = 1", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert!(pulled_at.is_some_and(|at| (crate::catalog::now() - at).abs() < 60));
        pulls.record(&repo, "sha256:01");
        assert!(
            pulls.state.lock().unwrap().pending.is_empty(),
            "written within the hour: not queued"
        );
        assert_eq!(pulls.flush(&catalog).await.unwrap(), 0);
        catalog.close();
    }

    #[test]
    fn the_first_matching_rule_applies() {
        let rules = vec![rule(&["spack/ci"]), rule(&["spack/**"])];
        assert_eq!(rule_for(&rules, "spack/ci").map(|(i, _)| i), Some(1));
        assert_eq!(rule_for(&rules, "spack/x/y").map(|(i, _)| i), Some(2));
        assert!(rule_for(&rules, "other").is_none());
    }

    #[test]
    fn each_condition_keeps_and_nothing_else_does() {
        let now = 1_000_000;
        let mut r = rule(&["**"]);
        r.keep_last = Some(1);
        r.keep_pushed_within = Some(Period::parse("1d").unwrap());
        r.keep_pulled_within = Some(Period::parse("7d").unwrap());
        r.keep_tags = vec![Pattern::new("release-*")];
        let s = snapshot(&["newest"], &["keptspec"]);
        let old = now - 30 * 86_400;
        assert!(decide(&r, &s, &tag("newest", old, None, None), now).is_none());
        assert!(decide(&r, &s, &tag("fresh", now - 3600, None, None), now).is_none());
        assert!(decide(&r, &s, &tag("pulled", old, Some(now - 86_400), None), now).is_none());
        assert!(decide(&r, &s, &tag("release-1", old, None, None), now).is_none());
        assert!(decide(&r, &s, &tag("x.spack", old, None, Some("keptspec")), now).is_none());
        assert!(decide(&r, &s, &tag("index.spack", old, None, None), now).is_none());
        let mut only_releases = rule(&["**"]);
        only_releases.keep_tags = vec![Pattern::new("release-*")];
        let during = tag("pushed-during-the-pass", now + 5, None, None);
        assert!(
            decide(&only_releases, &s, &during, now + 10).is_none(),
            "left for the next pass"
        );
        let before = tag("pushed-before", now - 1, None, None);
        assert!(decide(&only_releases, &s, &before, now + 10).is_some());
        let why = decide(&r, &s, &tag("stale", old, Some(now - 8 * 86_400), Some("other")), now).unwrap();
        assert_eq!(
            why,
            "not among the last 1 pushed; pushed 30d ago (> 1d); pulled 8d ago (> 1w); matches no keep_tags; in no keep-list"
        );
    }
}
