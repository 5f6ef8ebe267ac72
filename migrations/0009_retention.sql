-- Retention (schema version 9): last-pulled times and Spack keep-lists.

-- When the manifest was last served by a GET or HEAD (by tag or by digest), in unix seconds;
-- NULL: never since this column exists. Written lazily, in batches, and only when the stored
-- value is more than an hour old, so it is accurate to about an hour (see registry::retention).
ALTER TABLE manifests ADD COLUMN pulled_at INTEGER;

-- A named keep-list of a Spack build cache: its specs and their link/run dependency closure
-- are never removed by retention rules until `expires_at`. Re-creating a list replaces it.
CREATE TABLE spack_keep (
    repo_id     INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,             -- unix seconds; also when it was last replaced
    expires_at  INTEGER NOT NULL,             -- unix seconds
    created_by  TEXT,                         -- the identity that created it, NULL: anonymous
    PRIMARY KEY (repo_id, name)
) STRICT, WITHOUT ROWID;
CREATE INDEX spack_keep_by_expiry ON spack_keep(expires_at);

-- The spec DAG hashes a keep-list names (its roots).
CREATE TABLE spack_keep_hashes (
    repo_id  INTEGER NOT NULL,
    name     TEXT    NOT NULL,
    hash     TEXT    NOT NULL,
    PRIMARY KEY (repo_id, name, hash),
    FOREIGN KEY (repo_id, name) REFERENCES spack_keep(repo_id, name) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
CREATE INDEX spack_keep_hashes_by_hash ON spack_keep_hashes(repo_id, hash);

-- `keep_last`: a repository's tags newest first, and how many are newer than a given one.
CREATE INDEX tags_by_repo_updated ON tags(repo_id, updated_at);
