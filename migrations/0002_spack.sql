-- Spack build caches (schema version 2).
-- A "spec image" is a manifest tagged `<name>-<version>-<hash>.spack` whose config carries a
-- Spack spec. Each repository's buildcache index is derived from these tables.

-- One row per spec tag currently in the repository.
CREATE TABLE spack_specs (
    repo_id        INTEGER NOT NULL,
    tag            TEXT    NOT NULL,
    hash           TEXT    NOT NULL,          -- DAG hash of the root node
    manifest_id    INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    layout_version INTEGER NOT NULL,          -- buildcache_layout_version of the config
    PRIMARY KEY (repo_id, tag),
    FOREIGN KEY (repo_id, tag) REFERENCES tags(repo_id, name) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
CREATE INDEX spack_specs_by_hash ON spack_specs(repo_id, hash);
CREATE INDEX spack_specs_by_manifest ON spack_specs(manifest_id);

-- Every node of every spec DAG seen in a repository, once per hash, as Spack wrote it.
CREATE TABLE spack_nodes (
    repo_id   INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    hash      TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    version   TEXT    NOT NULL,
    platform  TEXT,
    os        TEXT,
    target    TEXT,
    compiler  TEXT,                            -- "gcc@12.2.0", when the node names one
    external  INTEGER NOT NULL,                -- 1 for externals (never pushed)
    node      TEXT    NOT NULL,                -- the node's JSON, byte for byte
    PRIMARY KEY (repo_id, hash)
) STRICT, WITHOUT ROWID;
CREATE INDEX spack_nodes_by_name ON spack_nodes(repo_id, name);

-- Dependency edges as each node records them.
CREATE TABLE spack_deps (
    repo_id   INTEGER NOT NULL,
    hash      TEXT    NOT NULL,                -- the dependent
    dep_hash  TEXT    NOT NULL,                -- its dependency
    deptypes  TEXT    NOT NULL,                -- JSON array, e.g. ["build","link"]
    PRIMARY KEY (repo_id, hash, dep_hash),
    FOREIGN KEY (repo_id, hash) REFERENCES spack_nodes(repo_id, hash) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
CREATE INDEX spack_deps_by_dep ON spack_deps(repo_id, dep_hash);

-- Which nodes each spec tag's DAG contains: the index lists exactly the nodes named here.
CREATE TABLE spack_closure (
    repo_id  INTEGER NOT NULL,
    tag      TEXT    NOT NULL,
    hash     TEXT    NOT NULL,
    PRIMARY KEY (repo_id, tag, hash),
    FOREIGN KEY (repo_id, tag) REFERENCES spack_specs(repo_id, tag) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
CREATE INDEX spack_closure_by_hash ON spack_closure(repo_id, hash);

-- Per repository: a generation counter bumped by every change to its spec tags, and the index
-- manifest last built (for `built_generation`).
CREATE TABLE spack_index (
    repo_id          INTEGER PRIMARY KEY REFERENCES repositories(id) ON DELETE CASCADE,
    generation       INTEGER NOT NULL,
    built_generation INTEGER,
    manifest_digest  TEXT
) STRICT;

CREATE TRIGGER spack_specs_added AFTER INSERT ON spack_specs BEGIN
    INSERT OR IGNORE INTO spack_index (repo_id, generation) VALUES (NEW.repo_id, 0);
    UPDATE spack_index SET generation = generation + 1 WHERE repo_id = NEW.repo_id;
END;

CREATE TRIGGER spack_specs_removed AFTER DELETE ON spack_specs BEGIN
    UPDATE spack_index SET generation = generation + 1 WHERE repo_id = OLD.repo_id;
END;
