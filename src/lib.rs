//! Stowage: a self-hostable OCI registry built to be the best binary cache for package managers.
//!
//! Layers, each calling only the ones below it:
//! - [`http`]: actix routes and handlers, error responses; [`ui`]: the web UI pages beside them;
//! - [`registry`]: the services (uploads, manifests, blobs, listings);
//! - [`catalog`] (SQLite, all SQL) and [`storage`] (blobs over `object_store`);
//! - [`oci`]: pure types and parsing;
//! - [`auth`]: users, tokens and the access policy (no HTTP types).

/// A fault-injection point (see `faults`): with the `fault-injection` feature, returns early
/// with the injected `std::io::Error` (through `?`) when a test's rule says so; without the
/// feature, nothing at all.
macro_rules! fault_point {
    ($op:ident, $path:expr) => {
        #[cfg(feature = "fault-injection")]
        $crate::faults::check($crate::faults::Op::$op, $path)?;
    };
}

pub mod admin;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod healthcheck;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod oci;
pub mod proxy;
pub mod registry;
pub mod runmodes;
pub mod server;
pub mod spack;
pub mod storage;
pub mod ui;
