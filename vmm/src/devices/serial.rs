//! The 16550 UART on COM1 (vm-superio), whose transmitted bytes go to a [`ConsoleSink`].

use std::io;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{ConsoleSink, MmioDevice};

/// The UART's interrupt line: an eventfd that an irqfd can route (Linux guests); payloads poll.
pub struct SerialIrq(EventFd);

impl Trigger for SerialIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Collects the bytes of one guest access so that the sink sees them as one batch.
struct SinkWriter {
    sink: Box<dyn ConsoleSink>,
    pending: Vec<u8>,
}

impl SinkWriter {
    fn new(sink: Box<dyn ConsoleSink>) -> Self {
        Self {
            sink,
            pending: Vec::new(),
        }
    }

    /// Hands the bytes of the current guest access to the sink.
    fn deliver(&mut self) {
        if !self.pending.is_empty() {
            self.sink.write_console(&self.pending);
            self.pending.clear();
        }
    }
}

impl io::Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    /// vm-superio flushes after every byte; the batch is delivered by [`SinkWriter::deliver`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Saved UART registers (vm-superio's `SerialState` as a serde struct).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

pub struct SerialDevice {
    uart: Serial<SerialIrq, NoEvents, SinkWriter>,
}

impl SerialDevice {
    pub fn new(sink: Box<dyn ConsoleSink>) -> io::Result<Self> {
        let irq = SerialIrq(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Self {
            uart: Serial::new(irq, SinkWriter::new(sink)),
        })
    }

    /// The UART's interrupt eventfd.
    pub fn irq(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    pub fn save_state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART with saved registers, writing to `sink`.
    pub fn from_state(state: &SerialDeviceState, sink: Box<dyn ConsoleSink>) -> io::Result<Self> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let irq = SerialIrq(EventFd::new(libc::EFD_NONBLOCK)?);
        let uart = Serial::from_state(&s, irq, NoEvents, SinkWriter::new(sink))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
        Ok(Self { uart })
    }
}

impl MmioDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The bus passes offsets inside the UART's 8-port window; one that does not even fit
        // a register index reads as an unclaimed port.
        let Ok(reg) = u8::try_from(offset) else {
            data.fill(0xff);
            return;
        };
        for b in data.iter_mut() {
            *b = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(reg) = u8::try_from(offset) else {
            tracing::warn!("UART write at offset {offset:#x} ignored");
            return;
        };
        // `rep outsb` delivers a whole buffer in one exit: feed it byte by byte, then hand the
        // sink one batch.
        for b in data {
            if let Err(e) = self.uart.write(reg, *b) {
                tracing::warn!("UART write failed: {e:?}");
            }
        }
        self.uart.writer_mut().deliver();
    }
}

/// ftvmm's batched console port ([`guest_abi::PORT_CONSOLE_BATCH`]): one VM exit hands the UART
/// a whole buffer from guest memory, where `rep outsb` would exit once per byte.
pub struct ConsoleBatchPort {
    mem: super::GuestMemory,
    uart: std::sync::Arc<std::sync::Mutex<SerialDevice>>,
}

impl ConsoleBatchPort {
    pub fn new(
        mem: super::GuestMemory,
        uart: std::sync::Arc<std::sync::Mutex<SerialDevice>>,
    ) -> Self {
        Self { mem, uart }
    }

    /// Reads the `{ len: u32, bytes }` record at `addr`; `None` if it is outside guest RAM.
    fn record(&self, addr: u64) -> Option<Vec<u8>> {
        use vm_memory::{Bytes, GuestAddress};
        let len: u32 = self.mem.read_obj(GuestAddress(addr)).ok()?;
        let mut bytes = vec![0u8; len.min(guest_abi::CONSOLE_BATCH_MAX) as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(addr + 4))
            .ok()?;
        Some(bytes)
    }
}

impl MmioDevice for ConsoleBatchPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let magic = guest_abi::CONSOLE_BATCH_MAGIC.to_le_bytes();
        for (b, m) in data
            .iter_mut()
            .zip(magic.iter().chain(std::iter::repeat(&0)))
        {
            *b = *m;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        let addr = u64::from(u32::from_le_bytes(raw));
        match self.record(addr) {
            Some(bytes) => self
                .uart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(0, &bytes),
            None => tracing::warn!(addr, "console batch record outside guest RAM"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);
    impl ConsoleSink for Capture {
        fn write_console(&mut self, bytes: &[u8]) {
            self.0.lock().unwrap().push(bytes.to_vec());
        }
    }

    #[test]
    fn a_string_write_reaches_the_sink_as_one_batch() {
        let cap = Capture::default();
        let mut dev = SerialDevice::new(Box::new(cap.clone())).unwrap();
        dev.write(0, b"hello\n");
        assert_eq!(*cap.0.lock().unwrap(), vec![b"hello\n".to_vec()]);
    }

    #[test]
    fn state_round_trips_and_keeps_the_sink() {
        let cap = Capture::default();
        let mut dev = SerialDevice::new(Box::new(cap.clone())).unwrap();
        dev.write(7, &[0x5a]); // scratch register
        dev.write(3, &[0x03]); // 8N1
        let state = dev.save_state();
        let mut other = SerialDevice::from_state(&state, Box::new(cap.clone())).unwrap();
        assert_eq!(other.save_state(), state);
        other.write(0, b"x");
        assert_eq!(cap.0.lock().unwrap().last().unwrap(), b"x");
    }

    #[test]
    fn the_batch_port_hands_a_guest_buffer_to_the_sink_in_one_piece() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        mem.write_obj(5u32, GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x8004)).unwrap();
        let cap = Capture::default();
        let uart = Arc::new(Mutex::new(
            SerialDevice::new(Box::new(cap.clone())).unwrap(),
        ));
        let mut port = ConsoleBatchPort::new(mem, uart);
        let mut magic = [0u8; 4];
        port.read(0, &mut magic);
        assert_eq!(u32::from_le_bytes(magic), guest_abi::CONSOLE_BATCH_MAGIC);
        port.write(0, &0x8000u32.to_le_bytes());
        // A record outside guest RAM is ignored, not a panic.
        port.write(0, &0xffff_fff0u32.to_le_bytes());
        assert_eq!(*cap.0.lock().unwrap(), vec![b"hello".to_vec()]);
    }
}
