-- The platform of a single image (schema version 14).
-- `os/architecture[/variant]` from the image's config blob, read once when the manifest is
-- pushed, so that the repository page never reads config blobs from storage. NULL for an index
-- (whose platforms are in its own content), an artifact, a config that names no platform, and
-- manifests pushed before this version.
ALTER TABLE manifests ADD COLUMN platform TEXT;
