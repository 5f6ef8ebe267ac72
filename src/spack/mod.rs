//! Spack build caches: recognising spec images and keeping each repository's index.
//!
//! Spack pushes every package as an image tagged `<name>-<version>-<hash>.spack`. Its config
//! blob is an OCI image config with extra keys (abridged from a real push):
//!
//! ```json
//! {"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:…"]},
//!  "config":{"Env":["PATH=…"]},
//!  "spec":{"_meta":{"version":5},"nodes":[
//!     {"name":"libb","version":"2.1","arch":{"platform":"linux","platform_os":"debian12",
//!      "target":{"name":"zen2",…}},"namespace":"ocitest","parameters":{…},
//!      "dependencies":[{"name":"liba","hash":"3vaq…","parameters":{"deptypes":["build","link"],"virtuals":[]}},…],
//!      "hash":"zgl5yzcqzdnkd7scv2tq3qoi5fyw7vh3"},
//!     {"name":"liba",…,"hash":"3vaqv4q37uunzetmg437xpx7ssadj3dh"},…]},
//!  "buildcache_layout_version":3,
//!  "binary_cache_checksum":{"hash_algorithm":"sha256","hash":"<layer sha256>"}}
//! ```
//!
//! `spec.nodes[0]` is the package itself; the other nodes are its whole dependency DAG.
//!
//! The buildcache index, the blob tagged `index.spack`, is a Spack database:
//!
//! ```json
//! {"database":{"version":"8","installs":{
//!    "zgl5yzcqzdnkd7scv2tq3qoi5fyw7vh3":{"spec":{…the node…},"ref_count":1,"in_buildcache":true},
//!    "qggmgd43aeio7nlqwjdua7qykkygiboj":{"spec":{…an external…},"ref_count":4,"in_buildcache":false}}}}
//! ```
//!
//! It lists every node of every spec tag's DAG; `in_buildcache` says whether that hash has a
//! spec tag of its own; `ref_count` is how many listed nodes depend on it. Clients read it
//! through a manifest with a 2-byte `{}` config and one layer holding the raw JSON.
//!
//! Stowage maintains this index itself: a spec tag's nodes are recorded in the catalog in the
//! same transaction as the tag (O(size of that spec's DAG), whatever the repository holds), and
//! the index blob is materialised when `index.spack` is read after a change
//! (`registry::spack`, `catalog::spack`). Two indexes are merged into one by [`merge`] (a
//! pull-through cache's upstream index and its cached specs, or a hosted cache and its
//! fallbacks).

pub mod merge;
mod spec;

pub use spec::{SpecImage, SpecNode, parse_config};

/// The tag clients read the index from.
pub const INDEX_TAG: &str = "index.spack";

/// Whether a tag names a spec image (Spack's own rule: ends in `.spack`, other than the index).
pub fn is_spec_tag(tag: &str) -> bool {
    tag.ends_with(".spack") && tag != INDEX_TAG
}

/// Configs larger than this are not read as Spack specs (real ones are a few tens of KiB).
pub const MAX_CONFIG_SIZE: u64 = 16 * 1024 * 1024;
