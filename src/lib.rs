//! Stowage: a self-hostable OCI registry built to be the best binary cache for package managers.
//!
//! Layers, each calling only the ones below it:
//! - [`http`]: actix routes and handlers, error responses;
//! - [`registry`]: the services (uploads, manifests, blobs, listings);
//! - [`catalog`] (SQLite, all SQL) and [`storage`] (blobs over `object_store`);
//! - [`oci`]: pure types and parsing;
//! - [`auth`]: users, tokens and the access policy (no HTTP types).

pub mod admin;
pub mod auth;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod oci;
pub mod registry;
pub mod server;
pub mod spack;
pub mod storage;
