//! The ftvmm micro-VMM: a KVM VM with its vCPUs, memory, boot and devices, and its complete
//! state save/restore. It knows nothing of replication: a checkpointer drives it from above
//! through pause, harvest, save, restore and resume, and plugs into its output sinks.

pub mod acpi;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod cast;
pub mod devices;
pub mod linux;
pub mod memory;
pub mod vcpu;
pub mod vm;
mod x86;

pub use builder::{GuestKind, VmConfig, VmShell, Vmm};
pub use vcpu::VmOutcome;
