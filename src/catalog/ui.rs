//! Catalog queries of the web UI (`crate::ui`): repository summaries and tag rows, both read
//! in keyset pages (after a name, in lexical order) with an optional substring filter.
//!
//! Cost per page, whatever the size of the registry:
//! - [`Catalog::repository_summaries`] examines at most `scan` repository names (like
//!   [`Catalog::visible_repositories`]); each one shown costs its own row (the tag count and
//!   sizes the catalog keeps there, see `migrations/0013_repo_stats.sql` for the invariant and
//!   `fsck` for its check) and its last push (`tags_by_repo_updated`, one index probe). No
//!   per-row scan of its tags or blobs: a repository of 10,000 tags costs what one of 1 does.
//! - [`Catalog::tag_rows`] walks the repository's tags in primary-key order from `after`,
//!   stopping at `limit` matches; the size of each row shown is its manifest's referenced blobs
//!   (an index: its children's, one level down, each blob counted once); an index's own bytes
//!   come along (a few KiB each) for its platforms.

use super::db::{self, params};

use super::Catalog;
use super::queries::repo_id;
use crate::error::Result;
use crate::oci::{RepoName, media};

/// One row of the repositories page.
#[derive(Debug, Clone)]
pub struct RepositorySummary {
    pub name: String,
    pub tags: u64,
    /// Bytes of the blobs the repository links plus its manifests' own bytes (blobs shared
    /// with other repositories are counted in each).
    pub stored_bytes: u64,
    /// When a tag was last pushed (unix seconds); `None` without tags.
    pub last_push: Option<i64>,
}

/// A page of [`Catalog::repository_summaries`].
#[derive(Debug, Clone)]
pub struct SummaryPage {
    pub repositories: Vec<RepositorySummary>,
    /// When the scan reached its bound before the page filled: the last name examined.
    pub resume_after: Option<String>,
}

/// One row of a repository's tag list.
#[derive(Debug, Clone)]
pub struct TagRow {
    pub name: String,
    pub digest: String,
    pub media_type: String,
    pub artifact_type: Option<String>,
    /// The manifest's own bytes.
    pub manifest_size: u64,
    /// The blobs it references (an index: its children's blobs), each counted once.
    pub content_size: u64,
    /// When the tag was last pushed (unix seconds).
    pub pushed_at: i64,
    /// An index's bytes (to read its platforms from); `None` for any other manifest.
    pub index_content: Option<Vec<u8>>,
    /// A single image's platform, `os/architecture[/variant]`, as its config named it at push
    /// time (`None` for an index, an artifact, or an image pushed before it was recorded).
    pub platform: Option<String>,
}

impl Catalog {
    /// Repositories after `after` whose name contains `contains` and that `keep` accepts, with
    /// their summaries: up to `limit`, examining at most `scan` names. `keep` runs on a reader
    /// thread, so it must be cheap and must not block.
    pub async fn repository_summaries<F>(
        &self,
        after: Option<String>,
        contains: Option<String>,
        limit: u64,
        scan: u64,
        keep: F,
    ) -> Result<SummaryPage>
    where
        F: Fn(&str) -> bool + Send + 'static,
    {
        self.read(move |c| {
            let scan = scan.max(1);
            let mut names = c.prepare_cached(
                "SELECT id, name FROM repositories
                  WHERE name > ?1 AND (?2 = '' OR instr(name, ?2) > 0)
                  ORDER BY name LIMIT ?3",
            )?;
            let mut summary = c.prepare_cached(
                "SELECT tag_count, (SELECT max(updated_at) FROM tags WHERE repo_id = ?1),
                        blob_bytes + manifest_bytes
                   FROM repositories WHERE id = ?1",
            )?;
            let mut rows = names.query(params![
                after.clone().unwrap_or_default(),
                contains.clone().unwrap_or_default(),
                scan.min(i64::MAX as u64) as i64
            ])?;
            let mut repositories = Vec::new();
            let mut examined = 0u64;
            let mut last_examined = None;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let name: String = row.get(1)?;
                examined += 1;
                if keep(&name) {
                    let (tags, last_push, stored) = summary.query_row([id], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?, r.get::<_, i64>(2)?))
                    })?;
                    repositories.push(RepositorySummary {
                        name: name.clone(),
                        tags: tags.max(0) as u64,
                        stored_bytes: stored.max(0) as u64,
                        last_push,
                    });
                    if repositories.len() as u64 >= limit {
                        return Ok(SummaryPage {
                            repositories,
                            resume_after: None,
                        });
                    }
                }
                last_examined = Some(name);
            }
            let resume_after = if examined >= scan { last_examined } else { None };
            Ok(SummaryPage {
                repositories,
                resume_after,
            })
        })
        .await
    }

    /// Tags of `repo` after `after` whose name contains `contains`, at most `limit`, in
    /// lexical order; `None` when the repository does not exist.
    pub async fn tag_rows(
        &self,
        repo: &RepoName,
        after: Option<String>,
        contains: Option<String>,
        limit: u64,
    ) -> Result<Option<Vec<TagRow>>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else { return Ok(None) };
            let mut stmt = c.prepare_cached(
                "SELECT t.name, m.digest, m.media_type, m.artifact_type, m.size, t.updated_at,
                        (SELECT coalesce(sum(b.size), 0) FROM (
                             SELECT r.digest FROM manifest_refs r
                              WHERE r.manifest_id = m.id AND r.kind IN ('config', 'layer')
                             UNION
                             SELECT r2.digest FROM manifest_refs r
                               JOIN manifests child ON child.repo_id = m.repo_id AND child.digest = r.digest
                               JOIN manifest_refs r2 ON r2.manifest_id = child.id AND r2.kind IN ('config', 'layer')
                              WHERE r.manifest_id = m.id AND r.kind = 'manifest'
                         ) d JOIN blobs b ON b.digest = d.digest),
                        CASE WHEN m.media_type IN (?5, ?6) THEN m.content END,
                        m.platform
                   FROM tags t JOIN manifests m ON m.id = t.manifest_id
                  WHERE t.repo_id = ?1 AND t.name > ?2 AND (?3 = '' OR instr(t.name, ?3) > 0)
                  ORDER BY t.name LIMIT ?4",
            )?;
            let rows = stmt
                .query_map(
                    params![
                        id,
                        after.clone().unwrap_or_default(),
                        contains.clone().unwrap_or_default(),
                        limit.min(i64::MAX as u64) as i64,
                        media::OCI_INDEX,
                        media::DOCKER_LIST
                    ],
                    |r| {
                        Ok(TagRow {
                            name: r.get(0)?,
                            digest: r.get(1)?,
                            media_type: r.get(2)?,
                            artifact_type: r.get(3)?,
                            manifest_size: r.get::<_, i64>(4)?.max(0) as u64,
                            pushed_at: r.get(5)?,
                            content_size: r.get::<_, i64>(6)?.max(0) as u64,
                            index_content: r.get(7)?,
                            platform: r.get(8)?,
                        })
                    },
                )?
                .collect::<db::Result<Vec<_>>>()?;
            Ok(Some(rows))
        })
        .await
    }

    /// The tags of `repo` that name the manifest `digest`, in lexical order (at most `limit`).
    pub async fn tags_of_manifest(&self, repo: &RepoName, digest: String, limit: u64) -> Result<Vec<String>> {
        let repo = repo.to_string();
        self.read(move |c| {
            let Some(id) = repo_id(c, &repo)? else {
                return Ok(Vec::new());
            };
            let mut stmt = c.prepare_cached(
                "SELECT t.name FROM manifests m JOIN tags t ON t.manifest_id = m.id
                  WHERE m.repo_id = ?1 AND m.digest = ?2 ORDER BY t.name LIMIT ?3",
            )?;
            let names = stmt
                .query_map(params![id, digest, limit.min(i64::MAX as u64) as i64], |r| r.get(0))?
                .collect::<db::Result<Vec<String>>>()?;
            Ok(names)
        })
        .await
    }
}
