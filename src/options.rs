//! Command-line options shared by the commands that start a VM, and their parsing.

use std::path::PathBuf;

use checkpoint::policy::EpochBounds;
use clap::Args;
use vmm::devices::virtio::net::parse_mac;
use vmm::memory::parse_size;

/// The VM flags of `ftvmm run` (and of `ftvmm primary`).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The payload: a path to a static x86-64 ELF, or `builtin:NAME` (or give --kernel).
    #[arg(long)]
    pub payload: Option<String>,
    /// A Linux kernel to boot instead of a payload: an ELF vmlinux with a PVH entry, or a
    /// bzImage (64-bit boot protocol).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// An initrd (initramfs) for --kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line for --kernel (default: a console on the 16550, ttyS0);
    /// ftvmm appends virtio_mmio.device= entries for the virtio devices.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest RAM, e.g. 256M or 2G (64M..64G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// What the guest's reboot (a reset through ACPI, the i8042 or port 0xcf9) does: end the
    /// VM with status 0, or boot the guest again (`run` only).
    #[arg(long, value_enum, default_value_t = OnReboot::Exit)]
    pub on_reboot: OnReboot,
    /// Number of vCPUs; every one enters the payload with its id (a kernel starts the others).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[command(flatten)]
    pub host: HostArgs,
    /// Arguments handed to the payload (not for --kernel: use --cmdline).
    #[arg(last = true)]
    pub args: Vec<String>,
}

impl HostArgs {
    /// The resources these flags name, as the node crate takes them.
    pub fn spec(&self) -> node::guest::HostSpec {
        node::guest::HostSpec {
            kvm: self.kvm_device.clone(),
            console: self.console.clone(),
            disk: self.disk.clone(),
            net: self.net.clone(),
        }
    }
}

/// The host resources a VM uses on this node: flags of every command that runs a VM here.
#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    /// A raw disk image attached as virtio-blk. A pair's images must be identical at the start:
    /// the standby gets the primary's writes as epochs commit. Each node keeps a write-intent
    /// bitmap beside it (IMAGE.ftvmm-bitmap) when replicated.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// A virtio-net device on a tap: tap=NAME[,mac=MAC][,bridge=BR]. A pair's nodes each have
    /// their own tap with the same MAC; the standby's is silent until it takes over.
    #[arg(long, value_parser = parse_net)]
    pub net: Option<NetSpec>,
    /// Where the guest's console goes: stdio or file:PATH (written at the guest's stream
    /// offsets, so that the files of a primary and its standby line up).
    #[arg(long, default_value = "stdio", value_parser = parse_console)]
    pub console: ConsoleSpec,
    /// On exit, write what this node did as JSON (VM exits and run time; a primary's epochs,
    /// pauses and wire bytes; a standby's takeover epoch, detection and restore times, held
    /// frames sent and addresses announced, also written as soon as it has taken over).
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// The KVM device to use.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_device: PathBuf,
}

/// `ftvmm primary`: the VM flags of `run` plus the replication flags.
#[derive(Args, Debug, Clone)]
pub struct PrimaryArgs {
    /// The standby's address (HOST:PORT).
    #[arg(long)]
    pub peer: String,
    /// Fixed epochs of this many milliseconds, a Remus checkpoint period: shorthand for
    /// --epoch-min-ms N --epoch-max-ms N (by default epochs adapt to the guest).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000),
          conflicts_with_all = ["epoch_min_ms", "epoch_max_ms"])]
    pub epoch_ms: Option<u64>,
    /// An epoch with output waiting (console bytes, network frames) ends once it is this many
    /// milliseconds old [default: 2, or the maximum if that is smaller].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub epoch_min_ms: Option<u64>,
    /// No epoch lasts longer than this many milliseconds: a failover redoes at most this much
    /// of the guest's work [default: 500].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub epoch_max_ms: Option<u64>,
    /// Silence after which a node judges its peer dead, in milliseconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(20..=600_000))]
    pub failover_timeout_ms: u64,
    /// How long a standby that is alive (its heartbeats arrive) may leave a checkpoint
    /// unacknowledged, in milliseconds, before protection is dropped; meanwhile output waits
    /// (backpressure). Longer than the failover timeout: a slow standby is not a dead one.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(20..=3_600_000))]
    pub ack_timeout_ms: u64,
    /// How long to wait for the standby to answer at start, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// Run unprotected if no standby answers (instead of failing).
    #[arg(long)]
    pub allow_unprotected: bool,
    #[command(flatten)]
    pub vm: RunArgs,
}

impl PrimaryArgs {
    /// The epoch bounds these flags ask for.
    pub fn epochs(&self) -> Result<EpochBounds, String> {
        if let Some(ms) = self.epoch_ms {
            return Ok(EpochBounds::fixed(ms));
        }
        let max = self.epoch_max_ms.unwrap_or(EpochBounds::DEFAULT.max_ms);
        match self.epoch_min_ms {
            Some(min) if min > max => Err(format!(
                "--epoch-min-ms ({min}) must not be longer than the maximum epoch ({max} ms)"
            )),
            Some(min) => Ok(EpochBounds {
                min_ms: min,
                max_ms: max,
            }),
            None => Ok(EpochBounds {
                min_ms: EpochBounds::DEFAULT.min_ms.min(max),
                max_ms: max,
            }),
        }
    }
}

/// `ftvmm standby`: where to listen and the local resources the guest will use here after a
/// takeover (the VM itself comes from the primary).
#[derive(Args, Debug, Clone)]
pub struct StandbyArgs {
    /// Address to wait for the primary on (HOST:PORT).
    #[arg(long)]
    pub listen: String,
    /// Test setting: every fdatasync of this node's disk image takes this many milliseconds
    /// longer (a disk slow to make data durable).
    #[arg(long, default_value_t = 0, hide = true)]
    pub test_fsync_delay_ms: u64,
    #[command(flatten)]
    pub host: HostArgs,
}

/// What a guest's reboot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnReboot {
    /// End the VM (ftvmm exits with status 0).
    Exit,
    /// Boot the guest again in a fresh VM with the same flags; its console stream goes on.
    Restart,
}

pub use node::guest::{ConsoleSpec, NetSpec};

/// The MAC a guest gets when none is given (locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn parse_console(s: &str) -> Result<ConsoleSpec, String> {
    match s {
        "stdio" => Ok(ConsoleSpec::Stdio),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(ConsoleSpec::File(PathBuf::from(p))),
            _ => Err(format!("bad console '{s}': use stdio or file:PATH")),
        },
    }
}

fn parse_net(s: &str) -> Result<NetSpec, String> {
    let mut tap = None;
    let mut mac = DEFAULT_MAC;
    let mut bridge = None;
    for kv in s.split(',') {
        match kv.split_once('=') {
            Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
            Some(("mac", v)) => mac = parse_mac(v)?,
            Some(("bridge", v)) if !v.is_empty() => bridge = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "bad --net '{s}': use tap=NAME[,mac=MAC][,bridge=BR]"
                ))
            }
        }
    }
    let tap = tap.ok_or_else(|| format!("bad --net '{s}': tap=NAME is required"))?;
    Ok(NetSpec { tap, mac, bridge })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Primary {
        #[command(flatten)]
        args: PrimaryArgs,
    }

    fn epochs(flags: &[&str]) -> Result<EpochBounds, String> {
        let argv = ["ftvmm", "--peer", "h:1", "--payload", "builtin:seq"];
        let p = Primary::try_parse_from(argv.iter().chain(flags)).map_err(|e| e.to_string())?;
        p.args.epochs()
    }

    #[test]
    fn epoch_flags() {
        assert_eq!(epochs(&[]), Ok(EpochBounds::DEFAULT));
        assert_eq!(epochs(&["--epoch-ms", "40"]), Ok(EpochBounds::fixed(40)));
        let b = |min_ms, max_ms| Ok(EpochBounds { min_ms, max_ms });
        assert_eq!(epochs(&["--epoch-min-ms", "5"]), b(5, 500));
        assert_eq!(epochs(&["--epoch-max-ms", "1000"]), b(2, 1000));
        assert_eq!(
            epochs(&["--epoch-max-ms", "1"]),
            b(1, 1),
            "the default minimum yields"
        );
        assert!(epochs(&["--epoch-min-ms", "50", "--epoch-max-ms", "40"])
            .unwrap_err()
            .contains("--epoch-min-ms (50)"));
        assert!(epochs(&["--epoch-ms", "40", "--epoch-max-ms", "100"]).is_err());
        assert!(epochs(&["--epoch-min-ms", "0"]).is_err());
    }

    #[test]
    fn net_specs() {
        let n = parse_net("tap=ft0,mac=02:00:00:00:00:01,bridge=br0").unwrap();
        assert_eq!(n.tap, "ft0");
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(n.bridge.as_deref(), Some("br0"));
        assert_eq!(parse_net("tap=x").unwrap().mac, DEFAULT_MAC);
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=x,mac=zz").is_err());
        assert!(parse_net("tap=x,speed=10").is_err());
    }

    #[test]
    fn consoles() {
        assert_eq!(parse_console("stdio"), Ok(ConsoleSpec::Stdio));
        assert_eq!(
            parse_console("file:/tmp/c"),
            Ok(ConsoleSpec::File("/tmp/c".into()))
        );
        assert!(parse_console("tty").is_err());
    }
}
