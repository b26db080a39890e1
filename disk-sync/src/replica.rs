//! Standby side: [`Replica`] applies a committed epoch's writes to the standby's image, durably,
//! before the epoch is acknowledged.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmm::cast::usize_to_u64;

use crate::{DiskOp, DiskSyncError};

/// Standby side: the standby's image, to which committed epochs are applied. Until an epoch
/// commits its writes are held by the caller, not here: the image only ever holds whole,
/// committed epochs, so at takeover it matches the memory of the last committed checkpoint.
#[derive(Debug)]
pub struct Replica {
    file: File,
    size: u64,
    /// Added to every fdatasync: a test setting that makes this image a disk slow to make
    /// data durable (see [`Replica::with_sync_delay`]).
    sync_delay: std::time::Duration,
}

impl Replica {
    /// Opens the standby's image read-write (O_RDWR, no truncation). It must be a regular file
    /// (its size is the image's).
    pub fn open(path: &Path) -> Result<Replica, DiskSyncError> {
        let open_err = |source: io::Error| DiskSyncError::ReplicaOpen {
            path: path.to_owned(),
            source,
        };
        let (file, meta) = crate::open_regular_file(path, false).map_err(open_err)?;
        Ok(Replica {
            file,
            size: meta.len(),
            sync_delay: std::time::Duration::ZERO,
        })
    }

    /// For tests and drills: every fdatasync of this image takes `delay` longer, as on a
    /// disk that is busy flushing something else.
    pub fn with_sync_delay(mut self, delay: std::time::Duration) -> Replica {
        self.sync_delay = delay;
        self
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks every op lies inside the image (before writing anything, so a malformed epoch
    /// changes nothing), writes the writes in order (pwrite, handling short writes), then
    /// fdatasync once if the epoch had any op: when this returns Ok the epoch is durable.
    /// Errors carry the offset and the OS error (ENOSPC shows "No space left on device"); after
    /// an error the image may hold part of the epoch, so the standby must not take over from it
    /// and the primary drops protection.
    pub fn apply(&mut self, ops: &[DiskOp]) -> Result<(), DiskSyncError> {
        for op in ops {
            if let DiskOp::Write { offset, data } = op {
                let len = usize_to_u64(data.len());
                match offset.checked_add(len) {
                    Some(end) if end <= self.size => {}
                    _ => {
                        return Err(DiskSyncError::OutOfRange {
                            offset: *offset,
                            len,
                            size: self.size,
                        })
                    }
                }
            }
        }
        for op in ops {
            if let DiskOp::Write { offset, data } = op {
                self.write_all(*offset, data)?;
            }
        }
        // A Flush op needs nothing of its own: the epoch is made durable as a whole here.
        if !ops.is_empty() {
            self.file.sync_data().map_err(DiskSyncError::StandbySync)?;
            std::thread::sleep(self.sync_delay);
        }
        Ok(())
    }

    /// pwrite until `data` is all written; an error names the offset at which the failing
    /// pwrite started, which is where the image stops holding the epoch.
    fn write_all(&mut self, offset: u64, mut data: &[u8]) -> Result<(), DiskSyncError> {
        let mut at = offset;
        while !data.is_empty() {
            match self.file.write_at(data, at) {
                Ok(0) => {
                    return Err(DiskSyncError::StandbyWrite {
                        offset: at,
                        source: io::Error::new(io::ErrorKind::WriteZero, "pwrite wrote nothing"),
                    })
                }
                Ok(n) => {
                    data = &data[n..];
                    at += usize_to_u64(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(DiskSyncError::StandbyWrite { offset: at, source }),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use super::*;
    use crate::testutil::TempDir;

    fn sparse_image(path: &Path, size: u64) {
        File::create(path).unwrap().set_len(size).unwrap();
    }

    #[test]
    fn apply_writes_the_epoch_durably() {
        let dir = TempDir::new("replica");
        let path = dir.path().join("standby.raw");
        sparse_image(&path, 1 << 20);
        let mut replica = Replica::open(&path).unwrap();
        assert_eq!(replica.size(), 1 << 20);
        let ops = vec![
            DiskOp::Write {
                offset: 100,
                data: b"first".to_vec(),
            },
            DiskOp::Flush,
            DiskOp::Write {
                offset: 102,
                data: b"XY".to_vec(),
            },
            DiskOp::Write {
                offset: (1 << 20) - 3,
                data: b"end".to_vec(),
            },
        ];
        replica.apply(&ops).unwrap();
        replica.apply(&[]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(&bytes[100..105], b"fiXYt"); // later writes win, in order
        assert_eq!(&bytes[(1 << 20) - 3..], b"end");
        assert!(bytes[..100].iter().all(|&b| b == 0));
    }

    #[test]
    fn out_of_range_op_changes_nothing() {
        let dir = TempDir::new("replica-range");
        let path = dir.path().join("standby.raw");
        sparse_image(&path, 4096);
        let mut replica = Replica::open(&path).unwrap();
        let ops = vec![
            DiskOp::Write {
                offset: 0,
                data: b"valid".to_vec(),
            },
            DiskOp::Write {
                offset: 4090,
                data: vec![1; 7],
            },
        ];
        let err = replica.apply(&ops).unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk write 0xffa+7 lies outside the 0x1000-byte image"
        );
        let overflow = [DiskOp::Write {
            offset: u64::MAX,
            data: vec![1],
        }];
        assert!(replica.apply(&overflow).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), vec![0; 4096]);
    }

    #[test]
    fn open_refuses_a_missing_image() {
        let dir = TempDir::new("replica-missing");
        let err = Replica::open(&dir.path().join("nope.raw")).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot open standby disk "),
            "{err}"
        );
        assert!(Replica::open(dir.path()).is_err());
    }

    /// A tmpfs mounted for the test, unmounted on drop (a failing assertion included).
    struct TmpfsMount(PathBuf);

    impl TmpfsMount {
        fn new(dir: &Path, size: &str) -> TmpfsMount {
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir)
                .status()
                .expect("run mount");
            assert!(
                status.success(),
                "mount -t tmpfs failed ({status}): run as root"
            );
            TmpfsMount(dir.to_owned())
        }
    }

    impl Drop for TmpfsMount {
        fn drop(&mut self) {
            let ok = Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                // Still busy (a file open somewhere): detach it lazily rather than leak it.
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }

    #[test]
    fn full_standby_disk_reports_enospc() {
        let dir = TempDir::new("replica-enospc");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let _mount = TmpfsMount::new(&mnt, "256k");
        let path = mnt.join("standby.raw");
        sparse_image(&path, 4 << 20);
        let mut replica = Replica::open(&path).unwrap();
        let ops: Vec<DiskOp> = (0..16u64)
            .map(|i| DiskOp::Write {
                offset: i * (64 << 10),
                data: vec![0xa5; 64 << 10],
            })
            .collect();
        let err = replica.apply(&ops).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, DiskSyncError::StandbyWrite { .. }),
            "not a write error: {msg}"
        );
        assert!(msg.contains("No space left on device"), "{msg}");
        assert!(msg.starts_with("standby disk write at 0x"), "{msg}");
        drop(replica);
    }
}
