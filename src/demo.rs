//! `ftvmm demo`: the main job with no configuration. Boots the stencil workload (2-D heat
//! diffusion over two vCPUs), shows its progress as the guest prints it, then checks the
//! guest's checksum against the host's own run of the same kernel.
//! (Replication is not built yet: the guest runs unreplicated.)

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm::builder::HostIo;
use vmm::devices::console::StdoutConsole;
use vmm::devices::ConsoleSink;
use vmm::{VmConfig, VmOutcome, Vmm};

use crate::run::Error;

const N: usize = 1024;
const STEPS: u64 = 3000;
const VCPUS: u32 = 2;

/// Shows console bytes and keeps a copy to check the result.
struct Tee {
    out: StdoutConsole,
    copy: Arc<Mutex<Vec<u8>>>,
}

impl ConsoleSink for Tee {
    fn write_console(&mut self, bytes: &[u8]) {
        self.out.write_console(bytes);
        self.copy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
    }
}

pub fn demo() -> Result<ExitCode, Error> {
    println!(
        "ftvmm demo: stencil payload, {N}x{N} grid, {STEPS} Jacobi steps on {VCPUS} vCPUs \
         (unreplicated: replication is not built yet)"
    );
    let copy = Arc::new(Mutex::new(Vec::new()));
    let io = HostIo {
        kvm_path: "/dev/kvm".into(),
        console: Box::new(Tee {
            out: StdoutConsole,
            copy: copy.clone(),
        }),
        disk: None,
        net: None,
    };
    let config = VmConfig {
        mem_size: 256 << 20,
        vcpus: VCPUS,
        args: vec![
            format!("n={N}"),
            format!("steps={STEPS}"),
            "report=250".into(),
        ],
    };
    let payload = crate::payloads::builtin("stencil").ok_or("stencil payload missing")?;
    let start = Instant::now();
    let mut vmm = Vmm::boot_payload(&config, payload, io)?;
    vmm.start()?;
    let outcome = vmm.wait();
    let guest_s = start.elapsed().as_secs_f64();
    if outcome != VmOutcome::Exited(0) {
        return Ok(crate::run::exit_status(outcome));
    }
    let text =
        String::from_utf8_lossy(&copy.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let guest = text
        .lines()
        .find_map(|l| l.strip_prefix("checksum "))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or("the guest printed no checksum")?;
    println!("guest finished in {guest_s:.2} s; computing the host reference...");
    let host = stencil_core::reference_checksum(N, STEPS);
    if guest == host {
        println!("checksum {guest:016x} equals the host's own run of the kernel: OK");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("checksum MISMATCH: guest {guest:016x}, host {host:016x}");
        Ok(ExitCode::FAILURE)
    }
}
