-- SQLite 0018: composite blobs and the Spack index's segment layout (the reasons, the
-- invariants and what each column means are written there).
ALTER TABLE blobs ADD COLUMN composite BIGINT NOT NULL DEFAULT 0 CHECK (composite IN (0, 1));

CREATE TABLE blob_pieces (
    digest   TEXT COLLATE "C" NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
    ordinal  BIGINT NOT NULL CHECK (ordinal >= 0),
    piece    TEXT COLLATE "C" NOT NULL REFERENCES blobs(digest),
    start    BIGINT NOT NULL CHECK (start >= 0),
    len      BIGINT NOT NULL CHECK (len > 0),
    PRIMARY KEY (digest, ordinal)
);
CREATE INDEX blob_pieces_by_piece ON blob_pieces(piece, digest, ordinal);

CREATE TABLE spack_index_layout (
    repo_id  BIGINT NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    seg      BIGINT NOT NULL,
    blob     TEXT COLLATE "C" NOT NULL,
    start    BIGINT NOT NULL CHECK (start >= 0),
    len      BIGINT NOT NULL CHECK (len > 0),
    comma    BIGINT NOT NULL CHECK (comma IN (0, 1)),
    PRIMARY KEY (repo_id, seg)
);
CREATE INDEX spack_index_layout_by_blob ON spack_index_layout(blob, repo_id, seg);

CREATE TABLE spack_index_dirty (
    repo_id  BIGINT NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    seg      BIGINT NOT NULL,
    mark     BIGINT NOT NULL,
    PRIMARY KEY (repo_id, seg)
);

-- A mark is only ever compared for equality with a value a build read (the build deletes the
-- marks it read by value), so it must change in every transaction that changes its segment;
-- SQLite counts changes. Here the mark is the changing transaction's id, written once per
-- transaction: counting would update the same row once per node row changed, and every update
-- of a row within one transaction adds a row version the next one must walk past (a
-- 30,000-node spec's transaction became quadratic in its size).
CREATE FUNCTION spack_index_node_marked() RETURNS trigger LANGUAGE plpgsql
    SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO spack_index_dirty (repo_id, seg, mark) VALUES (NEW.repo_id, NEW.id >> 9, txid_current())
        ON CONFLICT (repo_id, seg) DO UPDATE SET mark = excluded.mark
        WHERE spack_index_dirty.mark <> excluded.mark;
    RETURN NULL;
END $$;
CREATE TRIGGER spack_index_node_added AFTER INSERT ON spack_nodes
    FOR EACH ROW EXECUTE FUNCTION spack_index_node_marked();
CREATE TRIGGER spack_index_node_changed AFTER UPDATE OF closure_refs, spec_refs, ref_count ON spack_nodes
    FOR EACH ROW EXECUTE FUNCTION spack_index_node_marked();
