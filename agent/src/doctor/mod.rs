//! `vipsec doctor`: checks everything that would break failover on this node.
pub mod nft;
