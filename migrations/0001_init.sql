-- Stowage catalog, schema version 1.
-- Repositories, the blobs each may read, manifests (stored byte-exact), tags and referrers.
-- Blob bytes live in the object store; this database says which exist and who may read them.

CREATE TABLE repositories (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL              -- unix seconds
) STRICT;

-- One row per stored blob object (content-addressed, shared by every repository).
CREATE TABLE blobs (
    digest      TEXT    PRIMARY KEY,          -- "sha256:<hex>"
    size        INTEGER NOT NULL CHECK (size >= 0),
    created_at  INTEGER NOT NULL
) STRICT;

-- A blob is readable through a repository only if it is linked to it.
CREATE TABLE repo_blobs (
    repo_id     INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    digest      TEXT    NOT NULL REFERENCES blobs(digest),
    linked_at   INTEGER NOT NULL,
    PRIMARY KEY (repo_id, digest)
) STRICT, WITHOUT ROWID;
CREATE INDEX repo_blobs_by_digest ON repo_blobs(digest);

CREATE TABLE manifests (
    id            INTEGER PRIMARY KEY,
    repo_id       INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    digest        TEXT    NOT NULL,
    media_type    TEXT    NOT NULL,           -- served as Content-Type
    size          INTEGER NOT NULL,
    content       BLOB    NOT NULL,           -- the bytes exactly as pushed
    artifact_type TEXT,                       -- artifactType, or the config's media type
    subject       TEXT,                       -- digest of the subject manifest (referrers API)
    annotations   TEXT,                       -- the manifest's annotations object, JSON
    created_at    INTEGER NOT NULL,
    UNIQUE (repo_id, digest)
) STRICT;
CREATE INDEX manifests_by_subject ON manifests(repo_id, subject) WHERE subject IS NOT NULL;

-- What each manifest references: its config and layer blobs, or an index's child manifests.
CREATE TABLE manifest_refs (
    manifest_id INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    digest      TEXT    NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('config', 'layer', 'manifest')),
    PRIMARY KEY (manifest_id, kind, digest)
) STRICT, WITHOUT ROWID;
CREATE INDEX manifest_refs_by_digest ON manifest_refs(digest);

CREATE TABLE tags (
    repo_id     INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    manifest_id INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (repo_id, name)
) STRICT, WITHOUT ROWID;
CREATE INDEX tags_by_manifest ON tags(manifest_id);
