//! The console: a buffered writer that flushes each batch with ONE VM exit through ftvmm's
//! batched console port ([`guest_abi::PORT_CONSOLE_BATCH`]), under a spinlock so vCPUs' lines
//! do not interleave. On a VMM without that port it falls back to `rep outsb` on the UART
//! (COM1), which KVM emulates one byte (one exit) at a time.
//!
//! By default the buffer is flushed whenever it ends with a complete line. Payloads that print
//! many lines can raise the batch threshold with [`set_batch`] so that several lines go out
//! per exit; output order is unchanged. Everything is flushed before exit and park.
use core::fmt::{self, Write};

use core::sync::atomic::{AtomicBool, Ordering};

use guest_abi::{CONSOLE_BATCH_MAGIC, CONSOLE_BATCH_MAX, PORT_CONSOLE_BATCH, PORT_UART};

use crate::io::{inl, outsb};
use crate::sync::{RawSpinLock, SpinLock};

const BUF_SIZE: usize = CONSOLE_BATCH_MAX as usize;

/// A [`PORT_CONSOLE_BATCH`] record: the length, then the bytes. Page-aligned so that it fills
/// exactly one page.
#[repr(C, align(4096))]
struct Page {
    len: u32,
    bytes: [u8; BUF_SIZE],
}

/// Whether ftvmm has the batched console port (probed once at start-up).
static BATCH_PORT: AtomicBool = AtomicBool::new(false);

/// Probes for the batched console port (one VM exit; vCPU 0 at start-up).
pub(crate) fn init() {
    BATCH_PORT.store(
        inl(PORT_CONSOLE_BATCH) == CONSOLE_BATCH_MAGIC,
        Ordering::Relaxed,
    );
}

struct Console {
    buf: Page,
    len: usize,
    /// Flush once a complete line leaves at least this many bytes buffered (0: every line).
    batch: usize,
}

static CONSOLE: SpinLock<Console> = SpinLock::const_new(
    <RawSpinLock as lock_api::RawMutex>::INIT,
    Console {
        buf: Page {
            len: 0,
            bytes: [0; BUF_SIZE],
        },
        len: 0,
        batch: 0,
    },
);

impl Console {
    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        let record = &mut self.buf as *mut Page;
        if BATCH_PORT.load(Ordering::Relaxed) && (record as u64) < 1 << 32 {
            self.buf.len = self.len as u32;
            // SAFETY: hands ftvmm the address of the record, which it reads during this exit.
            // No `nomem`: the asm is a compiler barrier, so the record is written before it.
            unsafe {
                core::arch::asm!("out dx, eax", in("dx") PORT_CONSOLE_BATCH,
                                 in("eax") record as u32, options(nostack, preserves_flags));
            }
        } else {
            outsb(PORT_UART, &self.buf.bytes[..self.len]);
        }
        self.len = 0;
    }

    /// Flushes if the buffer ends with a complete line and the batch threshold is reached.
    fn line_done(&mut self) {
        if self.len > 0 && self.buf.bytes[self.len - 1] == b'\n' && self.len >= self.batch.max(1) {
            self.flush();
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            let n = bytes.len().min(BUF_SIZE - self.len);
            self.buf.bytes[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
            if self.len == BUF_SIZE {
                self.flush();
            }
        }
        Ok(())
    }
}

/// Sets the batch threshold in bytes: complete lines are flushed once at least this many bytes
/// are buffered (capped below the buffer size). 0 flushes every complete line.
pub fn set_batch(bytes: usize) {
    CONSOLE.lock().batch = bytes.min(BUF_SIZE - 256);
}

/// Writes out everything buffered.
pub fn flush() {
    CONSOLE.lock().flush();
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let mut console = CONSOLE.lock();
    let _ = console.write_fmt(args);
    console.line_done();
}

/// Writes `args` and flushes, even if the console lock is stuck (e.g. a panic while printing):
/// after a bounded wait it formats into a stack buffer and writes that directly.
pub(crate) fn emergency(args: fmt::Arguments) {
    for _ in 0..10_000_000u32 {
        if let Some(mut console) = CONSOLE.try_lock() {
            let _ = console.write_fmt(args);
            console.flush();
            return;
        }
        core::hint::spin_loop();
    }
    let mut w = StackWriter {
        buf: [0; 512],
        len: 0,
    };
    let _ = w.write_fmt(args);
    outsb(PORT_UART, &w.buf[..w.len]);
}

/// Flushes if the lock can be taken soon (before exit/park; never deadlocks).
pub(crate) fn try_flush() {
    for _ in 0..10_000_000u32 {
        if let Some(mut console) = CONSOLE.try_lock() {
            console.flush();
            return;
        }
        core::hint::spin_loop();
    }
}

struct StackWriter {
    buf: [u8; 512],
    len: usize,
}

impl Write for StackWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints to the console (buffered; see the module docs).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the console (buffered; see the module docs).
#[macro_export]
macro_rules! println {
    () => { $crate::console::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
