//! Complete VM state save/restore, in process: a guest paused mid-run, saved, and restored
//! into a fresh VM on a copy of its RAM continues exactly where it stopped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftvmm::payloads;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm::builder::HostIo;
use vmm::cast::u64_to_usize;
use vmm::devices::ConsoleSink;
use vmm::{memory, GuestKind, VmConfig, VmOutcome, Vmm};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl ConsoleSink for Capture {
    fn write_console(&mut self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

impl Capture {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

fn io(console: &Capture) -> HostIo {
    HostIo {
        kvm_path: "/dev/kvm".into(),
        console: Box::new(console.clone()),
        disk: None,
        net: None,
    }
}

fn check_restore_continues(payload: &str, args: &[&str], vcpus: u32, run_for: Duration) {
    let config = VmConfig {
        mem_size: 128 << 20,
        vcpus,
        args: args.iter().map(|s| s.to_string()).collect(),
        kind: GuestKind::Payload,
    };
    let elf = payloads::builtin(payload).unwrap();
    let original_out = Capture::default();
    let mut original = Vmm::boot_payload(&config, elf, io(&original_out)).unwrap();
    original.set_dirty_logging(true).unwrap();
    original.start().unwrap();
    // Pause only after the guest has printed something, however loaded the machine is.
    let start = std::time::Instant::now();
    while original_out.bytes().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guest printed nothing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(run_for);
    original.pause();
    assert_eq!(original.outcome(), None, "the guest ended before the pause");
    let state = original.save_state().unwrap();
    let prefix = original_out.bytes();
    let copy = memory::create_guest_memory(config.mem_size).unwrap();
    for region in original.memory().iter() {
        let mut buf = vec![0u8; u64_to_usize(region.len())];
        original
            .memory()
            .read_slice(&mut buf, region.start_addr())
            .unwrap();
        copy.write_slice(&buf, region.start_addr()).unwrap();
    }
    // Writing the copy marked its VMM bitmap; a restored VM starts with a clean log.
    original.resume();
    assert_eq!(original.wait(), VmOutcome::Exited(0));
    let full = original_out.bytes();

    let restored_out = Capture::default();
    let mut restored = Vmm::restore(&config, copy, &state, io(&restored_out)).unwrap();
    restored.start().unwrap();
    assert_eq!(restored.wait(), VmOutcome::Exited(0));
    let mut joined = prefix.clone();
    joined.extend(restored_out.bytes());
    assert!(
        !prefix.is_empty() && prefix.len() < full.len(),
        "pause fell mid-run"
    );
    assert_eq!(
        String::from_utf8_lossy(&joined),
        String::from_utf8_lossy(&full)
    );
}

#[test]
fn seq_restored_mid_run_continues_exactly() {
    check_restore_continues("seq", &["200000", "64"], 1, Duration::from_millis(60));
}

#[test]
fn stencil_on_two_vcpus_restored_mid_run_continues_exactly() {
    check_restore_continues(
        "stencil",
        &["n=256", "steps=20000", "report=1000"],
        2,
        Duration::from_millis(80),
    );
}
