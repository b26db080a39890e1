//! `ftvmm run`: boot a payload or a Linux kernel and run it to completion.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node::guest::{boot, console_sink, open_disk, open_net, GuestImage};
use vmm::builder::HostIo;
use vmm::devices::ConsoleSink;
use vmm::linux::{LinuxBoot, DEFAULT_CMDLINE};
use vmm::{GuestKind, VmConfig, VmOutcome};

use crate::options::{OnReboot, RunArgs};
use crate::{payloads, EXIT_GUEST_FAULT};

/// An error of ftvmm itself, printed as one line.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Reads the payload named by `--payload`.
pub fn load_payload(spec: &str) -> Result<Vec<u8>, Error> {
    match spec.strip_prefix("builtin:") {
        Some(name) => payloads::builtin(name).map(<[u8]>::to_vec).ok_or_else(|| {
            format!(
                "unknown builtin payload '{name}' (builtins: {})",
                payloads::NAMES.join(", ")
            )
            .into()
        }),
        None => std::fs::read(spec).map_err(|e| format!("cannot read payload {spec}: {e}").into()),
    }
}

pub fn vm_config(args: &RunArgs) -> VmConfig {
    VmConfig {
        mem_size: args.mem,
        vcpus: args.vcpus,
        args: args.args.clone(),
        kind: if args.kernel.is_some() {
            GuestKind::Linux
        } else {
            GuestKind::Payload
        },
    }
}

/// Checks that the flags name exactly one guest and reads it (a payload) or describes it (a
/// kernel, which the VMM reads while loading it).
pub fn guest(args: &RunArgs) -> Result<GuestImage, Error> {
    match (&args.payload, &args.kernel) {
        (Some(_), Some(_)) => Err("give either --payload or --kernel, not both".into()),
        (None, None) => Err("give the guest to boot: --payload or --kernel".into()),
        (Some(payload), None) => {
            if args.initrd.is_some() || args.cmdline.is_some() {
                return Err("--initrd and --cmdline need --kernel".into());
            }
            Ok(GuestImage::Payload(load_payload(payload)?))
        }
        (None, Some(kernel)) => {
            if !args.args.is_empty() {
                return Err(
                    "arguments after -- are for payloads; give a kernel --cmdline instead".into(),
                );
            }
            Ok(GuestImage::Linux(LinuxBoot {
                kernel: kernel.clone(),
                initrd: args.initrd.clone(),
                cmdline: args
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            }))
        }
    }
}

/// Maps how the guest ended to this process's exit status.
pub fn exit_status(outcome: VmOutcome) -> ExitCode {
    match outcome {
        // Like exit(2), which keeps the status's low byte.
        VmOutcome::Exited(code) => ExitCode::from(code.to_le_bytes()[0]),
        VmOutcome::Reset => {
            eprintln!("ftvmm: the guest rebooted; the VM ends here");
            ExitCode::SUCCESS
        }
        VmOutcome::Fault(reason) => {
            eprintln!("ftvmm: guest fault: {reason}");
            ExitCode::from(EXIT_GUEST_FAULT)
        }
    }
}

/// What `--stats-json` records about a run.
#[derive(serde::Serialize)]
struct RunStats {
    exits: vmm::bus::ExitCounts,
    run_ms: f64,
    outcome: String,
}

/// One console stream shared by the successive VMs of a guest that reboots.
#[derive(Clone)]
struct SharedConsole(Arc<Mutex<Box<dyn ConsoleSink>>>);

impl ConsoleSink for SharedConsole {
    fn write_console(&mut self, bytes: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_console(bytes);
    }
}

pub fn run(args: &RunArgs) -> Result<ExitCode, Error> {
    let guest = guest(args)?;
    let config = vm_config(args);
    let console = SharedConsole(Arc::new(Mutex::new(console_sink(&args.host.console, 0)?)));
    let start = std::time::Instant::now();
    let (vmm, outcome) = loop {
        // Every boot gets a fresh VM and reopens the disk and tap (the last VM closed them).
        let io = HostIo {
            kvm_path: args.host.kvm_device.clone(),
            console: Box::new(console.clone()),
            disk: open_disk(args.host.disk.as_deref())?,
            net: open_net(args.host.net.as_ref())?,
        };
        let mut vmm = boot(&config, &guest, io)?;
        vmm.start()?;
        let outcome = vmm.wait();
        if outcome != VmOutcome::Reset || args.on_reboot != OnReboot::Restart {
            break (vmm, outcome);
        }
        tracing::info!("the guest rebooted; booting it again");
    };
    if let Some(path) = &args.host.stats_json {
        let stats = RunStats {
            exits: vmm.exit_counts(),
            run_ms: start.elapsed().as_secs_f64() * 1e3,
            outcome: format!("{outcome:?}"),
        };
        std::fs::write(path, serde_json::to_vec_pretty(&stats)?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(exit_status(outcome))
}

/// A console sink that keeps everything the guest printed.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl ConsoleSink for Capture {
    fn write_console(&mut self, bytes: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The value after `key ` on the first line that starts with it.
    pub fn value(&self, key: &str) -> Option<u64> {
        self.text()
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
    }

    pub fn wait_for(&self, prefix: &str, limit: Duration) -> Result<(), Error> {
        let start = Instant::now();
        while !self.text().lines().any(|l| l.starts_with(prefix)) {
            if start.elapsed() > limit {
                return Err(format!("guest did not print '{prefix}' within {limit:?}").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

/// A child ftvmm node (demo, bench drills), killed by pid when dropped if it still runs.
pub struct Node(pub std::process::Child);

impl Node {
    /// The node's process id, as signals take it.
    pub fn pid(&self) -> Result<nix::unistd::Pid, Error> {
        Ok(nix::unistd::Pid::from_raw(i32::try_from(self.0.id())?))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
