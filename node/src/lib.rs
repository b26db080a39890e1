//! The self-healing pair: one daemon per host (`ftvmm node`) and one VMM process per protected
//! VM that it starts and supervises. Per VM, a role machine (a pure function of events) and
//! persisted generation identifiers decide which node runs the guest, when a returning node
//! resynchronises only what changed, and what status says; the VMM processes carry it out
//! through the `checkpoint` crate.

mod accept;
pub mod config;
pub mod control;
pub mod daemon;
pub mod drill;
pub mod generation;
pub mod guest;
pub mod metrics;
pub mod peer;
pub mod probe;
pub mod role;
pub mod status;
pub mod worker;

#[cfg(test)]
mod testutil;
