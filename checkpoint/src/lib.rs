//! Remus epochs for ftvmm: the primary pauses the VM, harvests dirty pages and VM state, streams
//! them to the standby and resumes; the standby stages each epoch, verifies it whole and commits
//! it atomically, so it always holds exactly one complete checkpoint to take over from.

pub mod delta;
pub mod hot;
pub mod input;
pub mod link;
pub mod outputs;
pub mod policy;
pub mod primary;
pub mod staging;
pub mod standby;
pub mod wire;
