-- The Spack index's derived figures, kept per node and per repository (schema version 15), so
-- that building `index.spack` is one ordered scan of `spack_nodes` that concatenates each
-- listed node's stored JSON with two integers (see `catalog::spack`), instead of a correlated
-- count per node over `spack_deps`, `spack_closure` and `spack_specs`.
--
-- The invariant (`stowage fsck` recounts and checks it, `--repair` restores it), per node
-- (repo_id, hash) of `spack_nodes`:
--   closure_refs = the number of rows of `spack_closure` with this repo_id and hash (the spec
--                  tags whose DAG holds the node; the index lists exactly the nodes where > 0);
--   spec_refs    = the number of rows of `spack_specs` with this repo_id and hash (the index's
--                  `in_buildcache` is spec_refs > 0);
--   ref_count    = the number of rows d of `spack_deps` with this repo_id and d.dep_hash = hash
--                  whose dependent (repo_id, d.hash) has closure_refs > 0 (the index's
--                  `ref_count`: listed nodes that depend on this one);
-- and per repository (`spack_index`):
--   specs            = the number of rows of `spack_specs` with this repo_id;
--   old_layout_specs = those of them with layout_version < 3 (Spack 0.2x pushed them: the index
--                      is then written as database version 7, which those clients read).
--
-- Why triggers: every path that changes spec tags (the manifest PUT's `sync_tag`, tag and
-- manifest deletes cascading to `spack_specs` and on to `spack_closure`, retention, the
-- collector, fsck's repair) changes those tables and nothing else, so counting in their own
-- triggers keeps the figures right, in the same transaction, whatever path the change took.
-- Each trigger costs a few primary-key probes (a closure row also walks the node's own edges):
-- a push costs O(nodes and edges of its DAG), whatever the repository holds. Only real
-- insertions and deletions count (an upsert taking DO NOTHING fires no INSERT trigger, and rows
-- deleted by ON DELETE CASCADE fire DELETE triggers). The columns counted are never updated in
-- place, and a node row is only deleted with its repository (whose figures then go with it).
ALTER TABLE spack_nodes ADD COLUMN closure_refs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE spack_nodes ADD COLUMN spec_refs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE spack_nodes ADD COLUMN ref_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE spack_index ADD COLUMN specs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE spack_index ADD COLUMN old_layout_specs INTEGER NOT NULL DEFAULT 0;

-- Back-fill what was recorded before this migration.
UPDATE spack_nodes SET
    closure_refs = (SELECT count(*) FROM spack_closure c WHERE c.repo_id = spack_nodes.repo_id AND c.hash = spack_nodes.hash),
    spec_refs = (SELECT count(*) FROM spack_specs s WHERE s.repo_id = spack_nodes.repo_id AND s.hash = spack_nodes.hash);
UPDATE spack_nodes SET
    ref_count = (SELECT count(*) FROM spack_deps d JOIN spack_nodes p ON p.repo_id = d.repo_id AND p.hash = d.hash
                  WHERE d.repo_id = spack_nodes.repo_id AND d.dep_hash = spack_nodes.hash AND p.closure_refs > 0);
UPDATE spack_index SET
    specs = (SELECT count(*) FROM spack_specs s WHERE s.repo_id = spack_index.repo_id),
    old_layout_specs = (SELECT count(*) FROM spack_specs s WHERE s.repo_id = spack_index.repo_id AND s.layout_version < 3);

-- A node recorded after rows that name it (not the push's order, which records nodes first):
-- count what is already there.
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
