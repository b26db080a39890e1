//! QEMU processes for the peers section: one `-machine microvm -accel kvm` VM per process, its
//! serial console in a file, its QMP monitor on a unix socket driven with serde_json. Every
//! process is killed by pid when its guard drops (also on error), and every wait is bounded.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::run::{Error, Node};

/// The program this section needs, and where it comes from.
pub const PROGRAM: &str = "qemu-system-x86_64";

/// The QEMU binary on PATH, or the one-line error that says how to get it.
pub fn find() -> Result<PathBuf, Error> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(PROGRAM))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("{PROGRAM} not found on PATH: run scripts/install-peers.sh (Debian's qemu-system-x86)")
                .into()
        })
}

/// How one QEMU process runs the guest.
pub struct Spec<'a> {
    /// Names its files in the run's directory.
    pub name: &'a str,
    pub kernel: &'a Path,
    pub mem_mib: u64,
    /// Where the serial console goes (None: nowhere, as for a COLO secondary).
    pub serial: Option<&'a Path>,
    /// `-incoming` URI (`unix:PATH` or `tcp:HOST:PORT`): a COLO secondary.
    pub incoming: Option<&'a str>,
    /// Log COLO's checkpoint trace events, time-stamped, to this file.
    pub trace: Option<&'a Path>,
}

/// A running QEMU and its monitor.
pub struct Qemu {
    /// Kills the process by pid when dropped.
    _process: Node,
    qmp: Qmp,
    stderr: PathBuf,
}

impl Qemu {
    pub fn spawn(qemu: &Path, dir: &Path, spec: &Spec) -> Result<Self, Error> {
        let socket = dir.join(format!("{}.qmp", spec.name));
        let stderr = dir.join(format!("{}.err", spec.name));
        let mut cmd = Command::new(qemu);
        // microvm's firmware (qboot) boots the image through its PVH note; no ACPI tables to
        // build (emulated instructions under PVM) and no RTC, which the payload never reads.
        // `arch-capabilities` off: KVM under PVM refuses QEMU's write of MSR 0x10a.
        cmd.args(["-machine", "microvm,acpi=off,rtc=off,isa-serial=on"])
            .args([
                "-accel",
                "kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-smp",
                "1",
            ])
            .args(["-m", &format!("{}M", spec.mem_mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(spec.kernel)
            .arg("-serial")
            .arg(match spec.serial {
                Some(path) => format!("file:{}", path.display()),
                None => "null".into(),
            })
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()));
        if let Some(addr) = spec.incoming {
            cmd.args(["-incoming", addr]);
        }
        if let Some(path) = spec.trace {
            // When a primary stops and restarts its VM, and what a secondary flushes from the
            // primary's pages into its VM at each checkpoint. (The file goes with the last
            // `-trace`: one after it without a file would send all to stderr.)
            cmd.args(["-msg", "timestamp=on"])
                .args(["-trace", "enable=colo_flush_ram_cache_begin", "-trace"])
                .arg(format!(
                    "enable=colo_vm_state_change,file={}",
                    path.display()
                ));
        }
        let mut node = Node(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr)?)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?,
        );
        // Connects once QEMU has made its socket (bounded); on error `node` kills it.
        let start = Instant::now();
        let qmp = loop {
            if let Ok(stream) = UnixStream::connect(&socket) {
                break Qmp::new(stream).map_err(|e| failure(&stderr, &e.to_string()))?;
            }
            if node.0.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(10) {
                return Err(failure(&stderr, "did not open its monitor"));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Self {
            _process: node,
            qmp,
            stderr,
        })
    }

    /// An error naming what QEMU said on stderr.
    pub fn failed(&self, what: &str) -> Error {
        failure(&self.stderr, what)
    }

    pub fn qmp(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        match self.qmp.execute(command, arguments) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.failed(&format!("{command}: {e}"))),
        }
    }

    /// The guest TSC rate QEMU's vCPU runs at, in kHz (what KVM gave it).
    pub fn tsc_khz(&mut self) -> Result<u64, Error> {
        let cpus = self.qmp("query-cpus-fast", json!({}))?;
        let path = cpus[0]["qom-path"]
            .as_str()
            .ok_or("query-cpus-fast named no vCPU")?
            .to_string();
        let hz = self.qmp(
            "qom-get",
            json!({"path": path, "property": "tsc-frequency"}),
        )?;
        Ok(hz.as_u64().ok_or("the vCPU has no tsc-frequency")? / 1000)
    }
}

/// An error for `what`, with the last line QEMU wrote to `stderr`.
fn failure(stderr: &Path, what: &str) -> Error {
    let said = std::fs::read_to_string(stderr).unwrap_or_default();
    let said = said
        .lines()
        .last()
        .unwrap_or("nothing on stderr")
        .to_string();
    format!("{PROGRAM} {what}: {said}").into()
}

/// A QMP connection: one JSON object per line each way.
struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

impl Qmp {
    fn new(stream: UnixStream) -> Result<Self, Error> {
        stream.set_read_timeout(Some(QMP_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut qmp = Self { stream, reader };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting {greeting}").into());
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err("QMP connection closed".into());
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command`; returns its `return` value (events on the way are skipped).
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))?;
        line.push(b'\n');
        self.stream.write_all(&line)?;
        let start = Instant::now();
        loop {
            let reply = self.read()?;
            if let Some(v) = reply.get("return") {
                return Ok(v.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(format!("{}", e["desc"]).into());
            }
            if start.elapsed() > QMP_TIMEOUT {
                return Err(format!("no reply to {command}").into());
            }
        }
    }
}
