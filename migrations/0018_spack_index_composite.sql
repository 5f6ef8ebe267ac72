-- Composite blobs and the Spack index's segment layout (schema version 18), so that a fresh
-- `index.spack` is written as the runs that changed since the last build plus references to
-- the bytes already stored (see `catalog::spack` and `storage::composite`).
--
-- A composite blob is a `blobs` row with `composite = 1` and no object of its own: its bytes
-- are the concatenation, in `ordinal` order, of the byte runs `[start, start + len)` of the
-- blobs `blob_pieces` names. It is written once, in one transaction with its pieces, and never
-- changed; its digest was computed by reading those runs back from the store.
--
-- Invariant: a blob that some composite names as a piece is never forgotten (the collector's
-- blob queries check `blob_pieces_by_piece`); deleting a composite's row deletes its pieces'
-- rows (ON DELETE CASCADE), which frees them for a later pass. A piece itself is never a
-- composite (the build only names blobs it stored or ones a layout names, which are plain).
-- An object published under a composite's digest (a client pushing the same bytes, a build
-- writing them whole) turns the row plain and drops its pieces (`queries::link_published`).
ALTER TABLE blobs ADD COLUMN composite INTEGER NOT NULL DEFAULT 0 CHECK (composite IN (0, 1));

CREATE TABLE blob_pieces (
    digest   TEXT    NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,   -- the composite
    ordinal  INTEGER NOT NULL CHECK (ordinal >= 0),
    piece    TEXT    NOT NULL REFERENCES blobs(digest),                     -- a plain blob
    start    INTEGER NOT NULL CHECK (start >= 0),
    len      INTEGER NOT NULL CHECK (len > 0),
    PRIMARY KEY (digest, ordinal)
) STRICT, WITHOUT ROWID;
CREATE INDEX blob_pieces_by_piece ON blob_pieces(piece);

-- The segment layout of a repository's last index build: a segment is the 512 rowids
-- `[seg * 512, seg * 512 + 512)` of `spack_nodes`, and its run is the serialised entries of the
-- repository's listed nodes in it, in rowid order, each but the index's first preceded by `,`
-- (`comma` says whether the run starts with one). A segment without listed nodes has no row.
-- The collector keeps every blob a layout names (`spack_index_layout_by_blob`), as it keeps
-- pieces; `blob` has no foreign key all the same (`stowage fsck --repair` forgets a damaged
-- blob whatever names it): the build checks that the blobs it reuses are still recorded, in
-- the transaction that records the composite naming them.
CREATE TABLE spack_index_layout (
    repo_id  INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    seg      INTEGER NOT NULL,
    blob     TEXT    NOT NULL,
    start    INTEGER NOT NULL CHECK (start >= 0),
    len      INTEGER NOT NULL CHECK (len > 0),
    comma    INTEGER NOT NULL CHECK (comma IN (0, 1)),
    PRIMARY KEY (repo_id, seg)
) STRICT, WITHOUT ROWID;
CREATE INDEX spack_index_layout_by_blob ON spack_index_layout(blob);

-- Segments whose run may differ from the layout's: every change of a node row's index entry
-- (a new row; a change of `closure_refs`, `spec_refs` or `ref_count`, whichever trigger or
-- statement makes it) bumps its segment's `mark` in the same transaction. A build reads the
-- marks in its snapshot and, when it records its layout, deletes only the marks still at the
-- value it read: a change committed meanwhile stays marked for the next build.
CREATE TABLE spack_index_dirty (
    repo_id  INTEGER NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    seg      INTEGER NOT NULL,
    mark     INTEGER NOT NULL,
    PRIMARY KEY (repo_id, seg)
) STRICT, WITHOUT ROWID;

CREATE TRIGGER spack_index_node_added AFTER INSERT ON spack_nodes BEGIN
    INSERT INTO spack_index_dirty (repo_id, seg, mark) VALUES (NEW.repo_id, NEW.id >> 9, 1)
        ON CONFLICT (repo_id, seg) DO UPDATE SET mark = mark + 1;
END;
CREATE TRIGGER spack_index_node_changed AFTER UPDATE OF closure_refs, spec_refs, ref_count ON spack_nodes BEGIN
    INSERT INTO spack_index_dirty (repo_id, seg, mark) VALUES (NEW.repo_id, NEW.id >> 9, 1)
        ON CONFLICT (repo_id, seg) DO UPDATE SET mark = mark + 1;
END;
