//! `vublk bench`: a VM-less load generator and data verifier for any vhost-user-blk backend.
//!
//! Building blocks: [`hist`] (latency histogram), [`rng`] (offsets and payloads), [`sector`]
//! (the verify sector format), [`cpu`] (the backend's CPU time).

pub mod cpu;
pub mod hist;
pub mod rng;
pub mod sector;
