-- Per-repository tag count and stored bytes for the web UI (schema version 13).
-- Kept by triggers in the transaction of every change they count, so that the repositories page
-- reads them instead of summing every blob a repository links on every view.
--
-- The invariant (`stowage fsck` recounts and checks it, `--repair` restores it):
--   tag_count      = the number of rows of `tags` with this repo_id;
--   blob_bytes     = the sum of `blobs.size` over the rows of `repo_blobs` with this repo_id
--                    (each distinct blob the repository links counted once, whether layers,
--                    configs or unreferenced uploads; a blob shared with other repositories is
--                    counted in each);
--   manifest_bytes = the sum of `manifests.size` over the rows of `manifests` with this repo_id.
--
-- Why triggers: every write path (push, mount, blob and manifest deletes, cascades from a
-- deleted manifest to its tags, the collector, retention, fsck's repair) changes those tables
-- and nothing else, so counting in the tables' own triggers keeps the figures right whatever
-- path the change took. Only real insertions and deletions count: an upsert that takes its
-- DO UPDATE / DO NOTHING branch fires no INSERT trigger (a re-link, a tag moved to another
-- manifest), and rows deleted by a foreign key's ON DELETE CASCADE fire DELETE triggers. The
-- columns the figures depend on (`repo_blobs.repo_id/digest`, `blobs.size`, `manifests.size`,
-- `tags.repo_id`) are never updated in place; a blob row is inserted before its first link and
-- deleted after its last.
ALTER TABLE repositories ADD COLUMN tag_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE repositories ADD COLUMN blob_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE repositories ADD COLUMN manifest_bytes INTEGER NOT NULL DEFAULT 0;

UPDATE repositories SET
    tag_count = (SELECT count(*) FROM tags WHERE repo_id = repositories.id),
    blob_bytes = (SELECT coalesce(sum(b.size), 0) FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest
                   WHERE rb.repo_id = repositories.id),
    manifest_bytes = (SELECT coalesce(sum(size), 0) FROM manifests WHERE repo_id = repositories.id);

CREATE TRIGGER repo_stats_tag_added AFTER INSERT ON tags BEGIN
    UPDATE repositories SET tag_count = tag_count + 1 WHERE id = NEW.repo_id;
END;
CREATE TRIGGER repo_stats_tag_removed AFTER DELETE ON tags BEGIN
    UPDATE repositories SET tag_count = tag_count - 1 WHERE id = OLD.repo_id;
END;

CREATE TRIGGER repo_stats_blob_linked AFTER INSERT ON repo_blobs BEGIN
    UPDATE repositories
       SET blob_bytes = blob_bytes + coalesce((SELECT size FROM blobs WHERE digest = NEW.digest), 0)
     WHERE id = NEW.repo_id;
END;
CREATE TRIGGER repo_stats_blob_unlinked AFTER DELETE ON repo_blobs BEGIN
    UPDATE repositories
       SET blob_bytes = blob_bytes - coalesce((SELECT size FROM blobs WHERE digest = OLD.digest), 0)
     WHERE id = OLD.repo_id;
END;

CREATE TRIGGER repo_stats_manifest_added AFTER INSERT ON manifests BEGIN
    UPDATE repositories SET manifest_bytes = manifest_bytes + NEW.size WHERE id = NEW.repo_id;
END;
CREATE TRIGGER repo_stats_manifest_removed AFTER DELETE ON manifests BEGIN
    UPDATE repositories SET manifest_bytes = manifest_bytes - OLD.size WHERE id = OLD.repo_id;
END;
