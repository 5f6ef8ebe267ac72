-- Garbage collection of untagged manifests and prompt removal of superseded Spack indexes
-- (schema version 8). See src/registry/gc.rs for the rules these columns serve.

-- When a manifest last gained a reason to stay: pushed (or pushed again), or a tag left it.
-- An untagged manifest is collected once this is older than the grace period, so a client
-- that read a tag just before it moved still finds the manifest it was given.
ALTER TABLE manifests ADD COLUMN touched_at INTEGER NOT NULL DEFAULT 0;
UPDATE manifests SET touched_at = created_at;

CREATE TRIGGER tags_moved_touch_manifest AFTER UPDATE OF manifest_id ON tags
    WHEN OLD.manifest_id <> NEW.manifest_id BEGIN
    UPDATE manifests SET touched_at = CAST(strftime('%s', 'now') AS INTEGER) WHERE id = OLD.manifest_id;
END;
CREATE TRIGGER tags_deleted_touch_manifest AFTER DELETE ON tags BEGIN
    UPDATE manifests SET touched_at = CAST(strftime('%s', 'now') AS INTEGER) WHERE id = OLD.manifest_id;
END;

-- The collector walks old manifests in (touched_at, id) order; the other columns make the
-- walk read the index only, never the manifests' content.
CREATE INDEX manifests_by_touched ON manifests(touched_at, id, repo_id, digest, subject);

-- Blobs of a superseded Spack index manifest, removed `gc.spack_index_grace_secs` after
-- `superseded_at` (unix seconds) rather than a whole grace period later: a reader that was
-- given the old index manifest has that long to fetch its blob.
CREATE TABLE gc_superseded (
    repo_id       INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    digest        TEXT    NOT NULL,
    superseded_at INTEGER NOT NULL,
    PRIMARY KEY (repo_id, digest)
) STRICT, WITHOUT ROWID;
CREATE INDEX gc_superseded_by_time ON gc_superseded(superseded_at);

-- Small persistent facts of the collector, e.g. when storage was last listed for orphans.
CREATE TABLE gc_state (
    key   TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
