//! The `ftvmm` command: its options, the commands that start VMs (run, primary, standby, demo,
//! bench) and the one that asks a node daemon (status), the builtin payloads, and the network
//! test bed that tests and benchmarks share.

pub mod bench;
pub mod demo;
pub mod node_args;
pub mod options;
pub mod pair;
pub mod payloads;
pub mod run;
pub mod testbed;

/// Exit status when ftvmm itself fails (bad input, no KVM, ...), as `env` and `timeout` do.
pub const EXIT_FTVMM_ERROR: u8 = 125;
/// Exit status when the guest crashed (triple fault, unhandled VM exit).
pub const EXIT_GUEST_FAULT: u8 = 124;
