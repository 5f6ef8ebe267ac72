-- Garbage collection (schema version 6).
-- A blob link that no manifest of its repository references is removed once it is older than
-- the grace period (gc.grace_secs), counted from repo_blobs.linked_at. Deleting a manifest
-- restarts that clock for the blobs it referenced, so that a pull that read the manifest just
-- before still finds its blobs. (BEFORE: the manifest's references cascade away with it.)
CREATE TRIGGER manifests_deleted_touch_links BEFORE DELETE ON manifests BEGIN
    UPDATE repo_blobs SET linked_at = CAST(strftime('%s', 'now') AS INTEGER)
     WHERE repo_id = OLD.repo_id
       AND digest IN (SELECT digest FROM manifest_refs WHERE manifest_id = OLD.id AND kind IN ('config', 'layer'));
END;

-- Finds the links no manifest references quickly.
CREATE INDEX repo_blobs_by_linked_at ON repo_blobs(linked_at);
