-- Spack search by name, version, compiler, target and os with facets, in keyset pages.
-- Each spec tag's row carries its root node's searchable fields (copied from `spack_nodes` in
-- the manifest PUT's transaction, by `catalog::spack::sync_tag`), so that a search page and its
-- facet counts read one small table through an index, never the nodes' JSON. Pages are in tag
-- order (`<name>-<version>-<hash>.spack`), the cursor being the last tag shown.
ALTER TABLE spack_specs ADD COLUMN name TEXT;
ALTER TABLE spack_specs ADD COLUMN version TEXT;
ALTER TABLE spack_specs ADD COLUMN platform TEXT;
ALTER TABLE spack_specs ADD COLUMN os TEXT;
ALTER TABLE spack_specs ADD COLUMN target TEXT;
ALTER TABLE spack_specs ADD COLUMN compiler TEXT;

-- Back-fill the specs recorded before this migration.
UPDATE spack_specs SET (name, version, platform, os, target, compiler) =
    (SELECT n.name, n.version, n.platform, n.os, n.target, n.compiler
       FROM spack_nodes n WHERE n.repo_id = spack_specs.repo_id AND n.hash = spack_specs.hash);

-- One index per filter, each in tag order within its value (the page order).
CREATE INDEX spack_specs_by_name ON spack_specs(repo_id, name, tag);
CREATE INDEX spack_specs_by_compiler ON spack_specs(repo_id, compiler, tag);
CREATE INDEX spack_specs_by_target ON spack_specs(repo_id, target, tag);
CREATE INDEX spack_specs_by_os ON spack_specs(repo_id, os, tag);
-- Facet counts of a whole cache (or a compiler's part of it) from the index alone.
CREATE INDEX spack_specs_facets ON spack_specs(repo_id, compiler, target, os);
