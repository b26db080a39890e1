//! `ftvmm demo`: the main job with no configuration. Runs the pair of
//! `examples/local-pair.toml` (two node daemons on this host over loopback, its paths and ports
//! moved into a scratch directory) through the whole protected cycle: the stencil VM runs
//! protected on node a; node a is killed; b takes over; a returns, resyncs and stands by; the
//! guest goes back to a by itself; the final checksum equals the one of a fault-free run of the
//! same guest. Ends with what each step cost.

use std::io::{IsTerminal, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use node::config::{self, Config, GuestSpec, NodeConfig};
use node::status::{Role, VmStatus};
use vmm::builder::HostIo;
use vmm::{GuestKind, VmConfig, VmOutcome, Vmm};

use crate::run::{Capture, Error, Node};

/// The pair the demo runs, as the README shows it.
const EXAMPLE: &str = include_str!("../examples/local-pair.toml");
const VM: &str = "stencil";
const LIMIT: Duration = Duration::from_secs(180);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Node a is killed once the guest has reported this share of its steps (in percent).
const KILL_AT_PERCENT: u64 = 15;

fn checksum_of(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("checksum "))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
}

fn step_of(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("step ")?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The fault-free run: the same guest, unreplicated, in this process.
fn fault_free(vm: &config::VmConfig) -> Result<u64, Error> {
    let GuestSpec::Payload { payload, args } = &vm.guest else {
        return Err("the demo's VM is not a payload".into());
    };
    let capture = Capture::default();
    let io = HostIo {
        kvm_path: "/dev/kvm".into(),
        console: Box::new(capture.clone()),
        disk: None,
        net: None,
    };
    let config = VmConfig {
        mem_size: vm.mem,
        vcpus: vm.vcpus,
        // The disk written at the end is the pair's business, not the checksum's.
        args: args
            .iter()
            .filter(|a| !a.starts_with("disk="))
            .cloned()
            .collect(),
        kind: GuestKind::Payload,
    };
    let elf = crate::run::load_payload(payload)?;
    let mut vmm = Vmm::boot_payload(&config, &elf, io)?;
    vmm.start()?;
    match vmm.wait() {
        VmOutcome::Exited(0) => {}
        other => return Err(format!("the fault-free run ended with {other:?}").into()),
    }
    Ok(checksum_of(&capture.text()).ok_or("the fault-free run printed no checksum")?)
}

/// The steps the guest runs, from its `steps=` argument.
fn steps(vm: &config::VmConfig) -> u64 {
    match &vm.guest {
        GuestSpec::Payload { args, .. } => args
            .iter()
            .find_map(|a| a.strip_prefix("steps=")?.parse().ok())
            .unwrap_or(0),
        GuestSpec::Kernel { .. } => 0,
    }
}

fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The example's config with its state, sockets and ports in `dir`; the disk images made.
fn scratch_config(dir: &Path) -> Result<Config, Error> {
    let d = dir.display().to_string();
    let text = EXAMPLE
        .replace("/var/lib/ftvmm", &format!("{d}/state"))
        .replace("/run/ftvmm", &format!("{d}/run"))
        .replace("127.0.0.1:7701", &format!("127.0.0.1:{}", free_port()?))
        .replace("127.0.0.1:7702", &format!("127.0.0.1:{}", free_port()?));
    let path = dir.join("local-pair.toml");
    std::fs::write(&path, text)?;
    for node in ["a", "b"] {
        std::fs::create_dir_all(dir.join("state").join(node))?;
    }
    let config = config::load(&path)?;
    for vm in &config.vms {
        for on_node in vm.on_node.values() {
            if let Some(disk) = &on_node.disk {
                std::fs::File::create(disk)?.set_len(4 << 20)?;
            }
        }
    }
    Ok(config)
}

/// The demo's two daemons and its view of them.
struct Pair {
    config: Config,
    dir: PathBuf,
    daemons: [Option<Node>; 2],
    exe: PathBuf,
}

impl Pair {
    fn node(&self, i: usize) -> &NodeConfig {
        &self.config.nodes[i]
    }

    /// Starts node `i`'s daemon, its log in the scratch directory.
    fn start(&mut self, i: usize) -> Result<(), Error> {
        use std::os::unix::process::CommandExt;
        let name = self.node(i).name.clone();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["node", "--config"])
            .arg(&self.config.path)
            .args(["--name", &name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the child process; the demo's
        // nodes die with it, even if it is interrupted.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.daemons[i] = Some(Node(cmd.spawn()?));
        Ok(())
    }

    /// Kills node `i`'s daemon with SIGKILL (its VM process dies with it).
    fn kill(&mut self, i: usize) -> Result<(), Error> {
        if let Some(mut node) = self.daemons[i].take() {
            node.0.kill()?;
            node.0.wait()?;
        }
        Ok(())
    }

    fn vm(&self, i: usize) -> Option<VmStatus> {
        let status = node::control::query_status(self.node(i), STATUS_TIMEOUT).ok()?;
        status.vms.into_iter().find(|v| v.name == VM)
    }

    /// Waits until `cond` holds of the VM on node `i`, calling `meanwhile` as it waits.
    fn wait(
        &self,
        i: usize,
        what: &str,
        cond: impl Fn(&VmStatus) -> bool,
        mut meanwhile: impl FnMut(&Self),
    ) -> Result<VmStatus, Error> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.vm(i).filter(|s| cond(s)) {
                return Ok(s);
            }
            if start.elapsed() > LIMIT {
                return Err(format!(
                    "node {} did not {what} within {} s (logs in {})",
                    self.node(i).name,
                    LIMIT.as_secs(),
                    self.dir.display()
                )
                .into());
            }
            meanwhile(self);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The guest's console stream so far, merged from both nodes' files.
    fn console(&self) -> String {
        let files: Vec<Vec<u8>> = (0..2)
            .map(|i| {
                let node = self.node(i);
                std::fs::read(node.state_dir.join(format!("{VM}.console"))).unwrap_or_default()
            })
            .collect();
        let len = files.iter().map(Vec::len).max().unwrap_or(0);
        let mut merged = vec![0u8; len];
        for file in &files {
            for (out, &b) in merged.iter_mut().zip(file) {
                if b != 0 {
                    *out = b;
                }
            }
        }
        let end = merged.iter().position(|&b| b == 0).unwrap_or(len);
        String::from_utf8_lossy(&merged[..end]).into_owned()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for node in self.daemons.iter_mut().flatten() {
            let _ = node.0.kill();
            let _ = node.0.wait();
        }
    }
}

/// One line of the summary table.
struct Cost {
    step: &'static str,
    took: String,
}

pub fn demo() -> Result<ExitCode, Error> {
    let dir = std::env::temp_dir().join(format!("ftvmm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = cycle(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn cycle(dir: &Path) -> Result<ExitCode, Error> {
    let config = scratch_config(dir)?;
    let vm = config.vm(VM)?.clone();
    let steps = steps(&vm);
    println!(
        "ftvmm demo: the pair of examples/local-pair.toml (nodes a and b on this host, over \
         loopback; files in a scratch directory), protecting the {VM} VM ({steps} steps)"
    );
    let start = Instant::now();
    let reference = fault_free(&vm)?;
    println!(
        "1. fault-free run (unreplicated): checksum {reference:016x} in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let mut costs = vec![Cost {
        step: "fault-free run",
        took: format!("{:.1} s", start.elapsed().as_secs_f64()),
    }];
    let mut pair = Pair {
        config,
        dir: dir.to_path_buf(),
        daemons: [None, None],
        exe: std::env::current_exe()?,
    };
    let (a, b) = (0, 1);
    let t = Instant::now();
    pair.start(a)?;
    pair.start(b)?;
    pair.wait(
        a,
        "protect the guest",
        |s| s.role == Role::Primary && s.protected,
        |_| {},
    )?;
    println!(
        "2. nodes a and b up: a runs the guest, b resynced its disk and holds its checkpoints \
         (protected after {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    costs.push(Cost {
        step: "start to protected",
        took: format!("{:.1} s", t.elapsed().as_secs_f64()),
    });
    let kill_step = steps * KILL_AT_PERCENT / 100;
    let reached = Instant::now();
    while step_of(&pair.console()) < kill_step {
        if reached.elapsed() > LIMIT {
            return Err("the guest made no progress".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = pair.vm(a).map_or(0, |s| s.acked);
    pair.kill(a)?;
    let killed = Instant::now();
    let step = step_of(&pair.console());
    let took_over = pair.wait(b, "take over", |s| s.role == Role::Primary, |_| {})?;
    let t = took_over
        .last_takeover
        .unwrap_or(node::status::TakeoverFigures {
            epoch: 0,
            detection_ms: 0.0,
            restore_ms: 0.0,
            held_frames: 0,
            held_console_bytes: 0,
            reason: String::new(),
        });
    println!(
        "3. killed node a (SIGKILL of its daemon; its VM process died with it) after step \
         {step}; b took over from checkpoint {} ({} acknowledged checkpoints lost): \
         detection {:.1} ms, restore {:.1} ms",
        t.epoch,
        before.saturating_sub(t.epoch),
        t.detection_ms,
        t.restore_ms
    );
    costs.push(Cost {
        step: "failover (detection + restore)",
        took: format!("{:.1} + {:.1} ms", t.detection_ms, t.restore_ms),
    });
    let t = Instant::now();
    pair.start(a)?;
    let progress = Progress::new();
    pair.wait(
        a,
        "stand by again",
        |s| s.role == Role::Standby,
        |p| {
            if let Some(r) = p.vm(a).and_then(|s| s.resync) {
                progress.show(&format!(
                    "   node a syncs from b (the disk blocks that changed, then memory): {:.0} % \
                 of {:.1} MiB",
                    r.percent,
                    r.total_bytes as f64 / f64::from(1 << 20)
                ));
            }
        },
    )?;
    progress.done();
    println!(
        "4. node a back: resynced what changed while it was away and holds b's checkpoints \
         ({:.1} s after its start)",
        t.elapsed().as_secs_f64()
    );
    costs.push(Cost {
        step: "return to protected",
        took: format!("{:.1} s", t.elapsed().as_secs_f64()),
    });
    let t = Instant::now();
    pair.wait(
        a,
        "take the guest back",
        |s| s.role == Role::Primary && s.protected,
        |_| {},
    )?;
    println!(
        "5. automatic failback: a is the preferred node; after failback_delay it runs the \
         guest again, protected by b ({:.1} s after it stood by)",
        t.elapsed().as_secs_f64()
    );
    costs.push(Cost {
        step: "failback (delay + swap)",
        took: format!("{:.1} s", t.elapsed().as_secs_f64()),
    });
    pair.wait(a, "finish the guest", |s| s.role == Role::Stopped, |_| {})?;
    let console = pair.console();
    let total = killed.elapsed();
    costs.push(Cost {
        step: "kill to the end of the run",
        took: format!("{:.1} s", total.as_secs_f64()),
    });
    let outcome = match checksum_of(&console) {
        Some(sum) if sum == reference => {
            println!(
                "6. the guest ended on a: checksum {sum:016x} equals the fault-free run's: OK"
            );
            ExitCode::SUCCESS
        }
        Some(sum) => {
            println!("6. checksum MISMATCH: {sum:016x}, fault-free {reference:016x}");
            ExitCode::FAILURE
        }
        None => return Err("the guest printed no checksum".into()),
    };
    println!("\nwhat each step cost:");
    for cost in &costs {
        println!("  {:<32} {}", cost.step, cost.took);
    }
    Ok(outcome)
}

/// One progress line: rewritten in place on a terminal, else printed when it changes.
struct Progress {
    terminal: bool,
    last: std::cell::RefCell<String>,
}

impl Progress {
    fn new() -> Self {
        Self {
            terminal: std::io::stdout().is_terminal(),
            last: std::cell::RefCell::new(String::new()),
        }
    }

    fn show(&self, line: &str) {
        let mut last = self.last.borrow_mut();
        if *last == line {
            return;
        }
        *last = line.to_string();
        let mut out = std::io::stdout();
        if self.terminal {
            let _ = write!(out, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    fn done(&self) {
        if self.terminal && !self.last.borrow().is_empty() {
            println!();
        }
    }
}
