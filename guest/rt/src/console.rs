//! The console: a buffered writer on the UART (COM1) that flushes with ONE `rep outsb` per
//! batch (a single VM exit), under a spinlock so vCPUs' lines do not interleave.
//!
//! By default the buffer is flushed whenever it ends with a complete line. Payloads that print
//! many lines can raise the batch threshold with [`set_batch`] so that several lines go out
//! per exit; output order is unchanged. Everything is flushed before exit and park.
use core::fmt::{self, Write};

use guest_abi::PORT_UART;

use crate::io::outsb;
use crate::sync::{RawSpinLock, SpinLock};

const BUF_SIZE: usize = 4096;

/// One page, page-aligned, so one `rep outsb` never crosses a page (one exit per flush).
#[repr(C, align(4096))]
struct Page([u8; BUF_SIZE]);

struct Console {
    buf: Page,
    len: usize,
    /// Flush once a complete line leaves at least this many bytes buffered (0: every line).
    batch: usize,
}

static CONSOLE: SpinLock<Console> = SpinLock::const_new(
    <RawSpinLock as lock_api::RawMutex>::INIT,
    Console {
        buf: Page([0; BUF_SIZE]),
        len: 0,
        batch: 0,
    },
);

impl Console {
    fn flush(&mut self) {
        outsb(PORT_UART, &self.buf.0[..self.len]);
        self.len = 0;
    }

    /// Flushes if the buffer ends with a complete line and the batch threshold is reached.
    fn line_done(&mut self) {
        if self.len > 0 && self.buf.0[self.len - 1] == b'\n' && self.len >= self.batch.max(1) {
            self.flush();
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            let n = bytes.len().min(BUF_SIZE - self.len);
            self.buf.0[self.len..self.len + n].copy_from_slice(&bytes[..n]);
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
