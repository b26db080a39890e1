//! Host tap devices: the backend of virtio-net.
//!
//! The tap is opened with IFF_TAP | IFF_NO_PI and without IFF_VNET_HDR, so each read or write is
//! exactly one Ethernet frame; the virtio-net device strips and adds the virtio header itself.
//! The fd is nonblocking. Dropping a [`Tap`] only closes its fd: a non-persistent tap vanishes
//! with its last fd. A [`WeakTap`] sends on a tap without keeping it open, for senders that
//! must not outlive the device (a tap name cannot be opened again while an old fd holds it).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Weak};

use crate::devices::FrameSink;

/// `SIOCBRADDIF`: add an interface to a bridge (not exported by libc for Linux).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Errors creating or configuring a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty, too long (max 15 bytes) or contains NUL")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("cannot create tap {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot bring tap {name} up: {source}")]
    Up {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("bridge {0} does not exist")]
    NoBridge(String),
    #[error("cannot add tap {tap} to bridge {bridge}: {source}")]
    Enslave {
        tap: String,
        bridge: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot duplicate tap {name} fd: {source}")]
    Clone {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Frames the kernel queues for the VMM on a tap. While a checkpoint pauses the guest the NIC
/// reads nothing, and the default 1000 frames (1.5 MB) overflowed within a 4 ms pause of a
/// stream into the guest: 100-300 frames dropped per 256 MiB, each loss a TCP recovery that
/// halved the sender's window. 8192 hold some 12 MB, a 30 ms pause at 400 MiB/s.
const TAP_QUEUE_FRAMES: i32 = 8192;

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: Arc<File>,
    name: String,
}

/// A handle that sends on a [`Tap`] only while some `Tap` still holds its fd open.
#[derive(Debug, Clone)]
pub struct WeakTap {
    file: Weak<File>,
    name: String,
}

impl WeakTap {
    /// Sends `frame` if the tap is still open; false once every [`Tap`] on it has gone.
    pub fn send_frame(&self, frame: &[u8]) -> bool {
        let Some(file) = self.file.upgrade() else {
            return false;
        };
        if let Err(e) = (&*file).write(frame) {
            tracing::debug!(
                "tap {}: frame of {} bytes dropped: {e}",
                self.name,
                frame.len()
            );
        }
        true
    }
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::BadName(name.to_owned()));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers/pointers); all-zero
    // is a valid value of every variant.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src.cast_signed();
    }
    Ok(req)
}

/// `flags` (IFF_*, which libc declares as `c_int`) as the `c_short` that `ifreq` holds them in:
/// the kernel's interface flags all lie in the low 16 bits.
#[allow(clippy::cast_possible_truncation)]
fn ifr_flags(flags: libc::c_int) -> libc::c_short {
    flags as libc::c_short
}

/// A throwaway socket for interface ioctls (SIOC*).
fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs an ifreq ioctl on `fd`.
fn ifreq_ioctl(fd: RawFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request used here reads/writes a `struct ifreq`, which `req` points to and
    // which outlives the call.
    let ret = unsafe { libc::ioctl(fd, request as _, req as *mut libc::ifreq) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Creates (or attaches to) tap `name` and brings it up. `name` may contain `%d` to let the
    /// kernel pick a number; [`Tap::name`] returns the actual name.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let mut req = ifreq_for(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        req.ifr_ifru.ifru_flags = ifr_flags(libc::IFF_TAP | libc::IFF_NO_PI);
        ifreq_ioctl(file.as_raw_fd(), libc::TUNSETIFF as libc::c_ulong, &mut req).map_err(
            |source| TapError::Create {
                name: name.to_owned(),
                source,
            },
        )?;
        // The kernel writes back the final name (relevant for "%d" templates).
        let actual: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c.cast_unsigned())
            .collect();
        let tap = Tap {
            file: Arc::new(file),
            name: String::from_utf8_lossy(&actual).into_owned(),
        };
        tap.bring_up()?;
        Ok(tap)
    }

    /// Brings the tap up, with a queue of [`TAP_QUEUE_FRAMES`].
    fn bring_up(&self) -> Result<(), TapError> {
        let err = |source| TapError::Up {
            name: self.name.clone(),
            source,
        };
        let sock = ctl_socket().map_err(err)?;
        let mut req = ifreq_for(&self.name)?;
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req).map_err(err)?;
        // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | ifr_flags(libc::IFF_UP | libc::IFF_RUNNING);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req).map_err(err)?;
        let mut req = ifreq_for(&self.name)?;
        // `ifr_qlen` shares the union's int with the interface index.
        req.ifr_ifru.ifru_ifindex = TAP_QUEUE_FRAMES;
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFTXQLEN, &mut req).map_err(err)
    }

    /// Adds the tap to the existing bridge `bridge`.
    pub fn enslave(&self, bridge: &str) -> Result<(), TapError> {
        let bridge_c = CString::new(bridge).map_err(|_| TapError::BadName(bridge.to_owned()))?;
        let tap_c =
            CString::new(self.name.as_str()).map_err(|_| TapError::BadName(self.name.clone()))?;
        // SAFETY: both pointers are valid NUL-terminated strings for the duration of the calls.
        let (bridge_idx, tap_idx) = unsafe {
            (
                libc::if_nametoindex(bridge_c.as_ptr()),
                libc::if_nametoindex(tap_c.as_ptr()),
            )
        };
        if bridge_idx == 0 {
            return Err(TapError::NoBridge(bridge.to_owned()));
        }
        let err = |source| TapError::Enslave {
            tap: self.name.clone(),
            bridge: bridge.to_owned(),
            source,
        };
        if tap_idx == 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let sock = ctl_socket().map_err(err)?;
        self.raise_mac(&sock).map_err(err)?;
        let mut req = ifreq_for(bridge)?;
        // if_nametoindex returns the kernel's (positive) int ifindex as unsigned.
        req.ifr_ifru.ifru_ifindex = tap_idx.cast_signed();
        ifreq_ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut req).map_err(err)
    }

    /// Gives the tap's host side an address above any NIC's (first byte 0xfe, as libvirt
    /// does), so that it never becomes its bridge's address: a Linux bridge takes its ports'
    /// lowest address, and when a tap that held it goes (a VM stops, a swap rebuilds it) the
    /// bridge's address changes under the host's own connections, which then stall until
    /// their peers learn it anew (a retransmission timeout, 200 ms at least).
    fn raise_mac(&self, sock: &OwnedFd) -> io::Result<()> {
        let mut req = ifreq_for(&self.name).map_err(io::Error::other)?;
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req)?;
        // SAFETY: SIOCGIFHWADDR filled the `ifru_hwaddr` member of the union.
        let mut addr = unsafe { req.ifr_ifru.ifru_hwaddr };
        addr.sa_data[0] = 0xfe_u8.cast_signed();
        req.ifr_ifru.ifru_hwaddr = addr;
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &mut req)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A second handle on the same tap queue (e.g. one for the RX worker, one for TX).
    pub fn try_clone(&self) -> Result<Tap, TapError> {
        Ok(Tap {
            file: Arc::new(self.file.try_clone().map_err(|source| TapError::Clone {
                name: self.name.clone(),
                source,
            })?),
            name: self.name.clone(),
        })
    }

    /// A sender on this tap's fd that does not keep it open.
    pub fn downgrade(&self) -> WeakTap {
        WeakTap {
            file: Arc::downgrade(&self.file),
            name: self.name.clone(),
        }
    }

    /// Reads one frame; `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.file).read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        (&*self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameSink for Tap {
    fn send_frame(&mut self, frame: &[u8]) {
        // Like a wire, a full tap queue drops the frame; TCP in the guest retransmits.
        if let Err(e) = self.write_frame(frame) {
            tracing::debug!(
                "tap {}: frame of {} bytes dropped: {e}",
                self.name,
                frame.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("a-name-longer-than-15"),
            Err(TapError::BadName(_))
        ));
    }

    /// Needs root (CAP_NET_ADMIN) and /dev/net/tun: fails without them.
    #[test]
    fn tap_create_up_enslave_and_io() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
        assert!(
            std::path::Path::new("/dev/net/tun").exists(),
            "this test needs /dev/net/tun"
        );
        let name = format!("ftvt{}", std::process::id() % 100_000);
        let mut tap = Tap::open(&name).unwrap();
        assert_eq!(tap.name(), name);
        let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "tap is up");
        let queue = std::fs::read_to_string(format!("/sys/class/net/{name}/tx_queue_len")).unwrap();
        assert_eq!(
            queue.trim(),
            TAP_QUEUE_FRAMES.to_string(),
            "tap queue length"
        );

        // Nothing queued: nonblocking read.
        let mut buf = [0u8; 2048];
        assert_eq!(
            tap.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        // A missing bridge is a clear error.
        let e = tap.enslave("ftvnobr0").unwrap_err();
        assert_eq!(e.to_string(), "bridge ftvnobr0 does not exist");

        // Enslave to a bridge made for the test.
        let br = format!("ftvb{}", std::process::id() % 100_000);
        assert!(
            ip(&["link", "add", &br, "type", "bridge"]),
            "cannot create bridge {br}"
        );
        let r = tap.enslave(&br);
        let master = std::fs::read_link(format!("/sys/class/net/{name}/master"));
        ip(&["link", "del", &br]);
        r.unwrap();
        assert!(master.unwrap().ends_with(&br));
        // Above any NIC's address: never the bridge's own.
        let mac = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap();
        assert!(mac.starts_with("fe:"), "{mac}");

        // Writing a frame works (the kernel accepts it on the tap's RX path).
        let mut frame = vec![0u8; 60];
        frame[0..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&[0x88, 0xb5]);
        assert_eq!(tap.write_frame(&frame).unwrap(), 60);

        let weak = tap.downgrade();
        assert!(weak.send_frame(&frame), "sends while the tap is open");
        let clone = tap.try_clone().unwrap();
        drop(tap);
        assert!(std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
        drop(clone);
        assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
        // The weak sender neither kept the tap alive nor sends on it now, and the name is free.
        assert!(!weak.send_frame(&frame));
        drop(Tap::open(&name).unwrap());
    }

    #[test]
    fn creation_error_is_clear() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
        // "lo" exists and is not a tap: TUNSETIFF fails with a message naming it.
        let e = Tap::open("lo").unwrap_err();
        assert!(e.to_string().starts_with("cannot create tap lo: "), "{e}");
    }
}
