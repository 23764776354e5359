//! The vipsec chaos lab: a multi-node network-namespace lab of real parts (strongSwan
//! charon, keepalived, etcd, the vipsec agent), a mail-like server and traffic probes, fault
//! injection, and the scenario, demo and benchmark code built on it.
//!
//! A [`lab::Setup`] chooses what runs on the nodes (a strongSwan baseline or vipsec), so the
//! same scenarios measure every set-up on the same lab.

pub mod bench;
pub mod clock;
pub mod demo;
pub mod lab;
pub mod nsexec;
pub mod scenario;
pub mod sim;
