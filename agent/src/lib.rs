//! vipsec: keeps IPsec-protected traffic alive across virtual IP moves.
//!
//! The failover policy lives in [`failover`], free of I/O. Each outside system sits behind
//! one small trait ([`store`], [`addrwatch`], [`keying`], [`kernel`]); [`runtime`] is the
//! only place that spawns tasks and carries out the core's actions.

pub mod addrwatch;
pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod config_reference;
pub mod doctor;
pub mod drill;
pub mod failover;
pub mod health;
pub mod host;
pub mod kernel;
pub mod keying;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod runtime;
pub mod store;
pub mod timeline;

/// Where backends send what they observe; the runtime feeds it to the failover core.
pub type InputSink = tokio::sync::mpsc::Sender<failover::Input>;
