-- `spack_nodes` as a rowid table (schema version 16), so that the index is one sequential scan.
-- stowage: foreign-keys-off spack_nodes spack_deps
--
-- Why: a node's JSON is about 1 KB. In a WITHOUT ROWID table (a B-tree of whole rows keyed by
-- (repo_id, hash)) SQLite keeps at most ~1,000 bytes of a row on its leaf page with 4 KiB
-- pages, so every node spilled its tail onto an overflow page of its own: ~4.5 KiB of pages per
-- node (2.2 GB at 500,000 nodes), each overflow page read with its own system call, in hash
-- order, i.e. scattered over the file. A rowid table stores a 1 KB row whole, three or four to
-- a page, in the order the rows were inserted; `spack_nodes_by_repo` lists a repository's rows
-- in that order, so building the index reads its pages front to back.
--
-- The index lists nodes in rowid order (the order they were first recorded; rows copied here
-- keep their hash order). Spack reads `installs` as a JSON object: order carries no meaning.
--
-- The table is rebuilt (new table, copy, drop, rename) with foreign keys off, as SQLite
-- documents for a change of table shape (the marker line above tells the runner): `spack_deps` refers to `spack_nodes`, and dropping the
-- old table with foreign keys on would cascade into it. The runner runs `foreign_key_check`
-- on the tables the marker names before it commits. Every trigger that names `spack_nodes` is dropped first and created again
-- (verbatim from migration 0015), since a rename checks the triggers against the schema.

DROP TRIGGER IF EXISTS spack_figures_node_added;
DROP TRIGGER IF EXISTS spack_figures_edge_added;
DROP TRIGGER IF EXISTS spack_figures_edge_removed;
DROP TRIGGER IF EXISTS spack_figures_closure_added;
DROP TRIGGER IF EXISTS spack_figures_closure_removed;
DROP TRIGGER IF EXISTS spack_figures_spec_added;
DROP TRIGGER IF EXISTS spack_figures_spec_removed;

CREATE TABLE spack_nodes_new (
    id           INTEGER PRIMARY KEY,
    repo_id      INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    hash         TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    platform     TEXT,
    os           TEXT,
    target       TEXT,
    compiler     TEXT,                         -- "gcc@12.2.0", when the node names one
    external     INTEGER NOT NULL,             -- 1 for externals (never pushed)
    node         TEXT    NOT NULL,             -- the node's JSON, byte for byte
    closure_refs INTEGER NOT NULL DEFAULT 0,
    spec_refs    INTEGER NOT NULL DEFAULT 0,
    ref_count    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (repo_id, hash)
) STRICT;
INSERT INTO spack_nodes_new
       (repo_id, hash, name, version, platform, os, target, compiler, external, node, closure_refs, spec_refs, ref_count)
SELECT repo_id, hash, name, version, platform, os, target, compiler, external, node, closure_refs, spec_refs, ref_count
  FROM spack_nodes ORDER BY repo_id, hash;
DROP TABLE spack_nodes;
ALTER TABLE spack_nodes_new RENAME TO spack_nodes;
CREATE INDEX spack_nodes_by_name ON spack_nodes(repo_id, name);
-- (repo_id, rowid): a repository's nodes in the order their rows lie in the table.
CREATE INDEX spack_nodes_by_repo ON spack_nodes(repo_id);

CREATE TRIGGER spack_figures_node_added AFTER INSERT ON spack_nodes BEGIN
    UPDATE spack_nodes SET
        closure_refs = (SELECT count(*) FROM spack_closure c WHERE c.repo_id = NEW.repo_id AND c.hash = NEW.hash),
        spec_refs = (SELECT count(*) FROM spack_specs s WHERE s.repo_id = NEW.repo_id AND s.hash = NEW.hash),
        ref_count = (SELECT count(*) FROM spack_deps d JOIN spack_nodes p ON p.repo_id = d.repo_id AND p.hash = d.hash
                      WHERE d.repo_id = NEW.repo_id AND d.dep_hash = NEW.hash AND p.closure_refs > 0)
     WHERE repo_id = NEW.repo_id AND hash = NEW.hash;
END;

-- An edge counts towards its dependency while its dependent is listed.
CREATE TRIGGER spack_figures_edge_added AFTER INSERT ON spack_deps
WHEN (SELECT closure_refs FROM spack_nodes WHERE repo_id = NEW.repo_id AND hash = NEW.hash) > 0 BEGIN
    UPDATE spack_nodes SET ref_count = ref_count + 1 WHERE repo_id = NEW.repo_id AND hash = NEW.dep_hash;
END;
CREATE TRIGGER spack_figures_edge_removed AFTER DELETE ON spack_deps
WHEN (SELECT closure_refs FROM spack_nodes WHERE repo_id = OLD.repo_id AND hash = OLD.hash) > 0 BEGIN
    UPDATE spack_nodes SET ref_count = ref_count - 1 WHERE repo_id = OLD.repo_id AND hash = OLD.dep_hash;
END;

-- A node becoming listed (its first closure row) or unlisted (its last) adds or removes its
-- edges from its dependencies' ref_count.
CREATE TRIGGER spack_figures_closure_added AFTER INSERT ON spack_closure BEGIN
    UPDATE spack_nodes SET closure_refs = closure_refs + 1 WHERE repo_id = NEW.repo_id AND hash = NEW.hash;
    UPDATE spack_nodes SET ref_count = ref_count + 1
     WHERE repo_id = NEW.repo_id
       AND hash IN (SELECT d.dep_hash FROM spack_deps d WHERE d.repo_id = NEW.repo_id AND d.hash = NEW.hash)
       AND (SELECT p.closure_refs FROM spack_nodes p WHERE p.repo_id = NEW.repo_id AND p.hash = NEW.hash) = 1;
END;
CREATE TRIGGER spack_figures_closure_removed AFTER DELETE ON spack_closure BEGIN
    UPDATE spack_nodes SET closure_refs = closure_refs - 1 WHERE repo_id = OLD.repo_id AND hash = OLD.hash;
    UPDATE spack_nodes SET ref_count = ref_count - 1
     WHERE repo_id = OLD.repo_id
       AND hash IN (SELECT d.dep_hash FROM spack_deps d WHERE d.repo_id = OLD.repo_id AND d.hash = OLD.hash)
       AND (SELECT p.closure_refs FROM spack_nodes p WHERE p.repo_id = OLD.repo_id AND p.hash = OLD.hash) = 0;
END;

-- Spec tags: the root's spec_refs and the repository's counts. The index row may not exist
-- yet (`spack_specs_added` of migration 2 creates it too; trigger order is not relied on).
CREATE TRIGGER spack_figures_spec_added AFTER INSERT ON spack_specs BEGIN
    UPDATE spack_nodes SET spec_refs = spec_refs + 1 WHERE repo_id = NEW.repo_id AND hash = NEW.hash;
    INSERT OR IGNORE INTO spack_index (repo_id, generation) VALUES (NEW.repo_id, 0);
    UPDATE spack_index SET specs = specs + 1, old_layout_specs = old_layout_specs + (NEW.layout_version < 3)
     WHERE repo_id = NEW.repo_id;
END;
CREATE TRIGGER spack_figures_spec_removed AFTER DELETE ON spack_specs BEGIN
    UPDATE spack_nodes SET spec_refs = spec_refs - 1 WHERE repo_id = OLD.repo_id AND hash = OLD.hash;
    UPDATE spack_index SET specs = specs - 1, old_layout_specs = old_layout_specs - (OLD.layout_version < 3)
     WHERE repo_id = OLD.repo_id;
END;
