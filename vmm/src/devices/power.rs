//! The ports through which a Linux guest reboots or powers off: the FADT's reset register and
//! hardware-reduced sleep control register, the i8042 controller's reset command (`reboot=k`)
//! and the PCI reset control register (`reboot=pci`). The vCPU loop looks at every port write
//! with [`power_event`]; [`PowerPorts`] answers reads so that a guest polling the i8042
//! status before its reset command sees an idle controller at once.

use super::MmioDevice;

/// The FADT's SLEEP_CONTROL_REG and SLEEP_STATUS_REG (hardware-reduced ACPI).
pub const PORT_ACPI_SLEEP: u16 = 0x600;
/// The FADT's RESET_REG.
pub const PORT_ACPI_RESET: u16 = 0x601;
/// The value the guest writes to [`PORT_ACPI_RESET`] to reset.
pub const RESET_VALUE: u8 = 1;
/// The sleep type of S5 (soft off), as the DSDT's `_S5_` names it.
pub const SLP_TYP_S5: u8 = 5;
/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;
const PORT_I8042_DATA: u16 = 0x60;
const PORT_I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
const PORT_PCI_RESET: u16 = 0xcf9;
/// RST_CPU in the PCI reset control register.
const PCI_RST_CPU: u8 = 1 << 2;

/// What a guest asked of the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    Reset,
    PowerOff,
}

/// The power event a guest's write of `data` to `port` requests, if any.
pub fn power_event(port: u16, data: &[u8]) -> Option<PowerEvent> {
    let v = *data.first()?;
    match port {
        PORT_ACPI_RESET if v == RESET_VALUE => Some(PowerEvent::Reset),
        PORT_ACPI_SLEEP if v & SLP_EN != 0 && (v >> 2) & 7 == SLP_TYP_S5 => {
            Some(PowerEvent::PowerOff)
        }
        PORT_I8042_CMD if v == I8042_RESET => Some(PowerEvent::Reset),
        PORT_PCI_RESET if v & PCI_RST_CPU != 0 => Some(PowerEvent::Reset),
        _ => None,
    }
}

/// The power ports' read side: every register reads as zero (an idle i8042, a clear sleep
/// status). Writes are power events or ignored.
#[derive(Default)]
pub struct PowerPorts;

impl PowerPorts {
    /// The port windows to claim: (base, length).
    pub const WINDOWS: [(u16, u16); 4] = [
        (PORT_I8042_DATA, 1),
        (PORT_I8042_CMD, 1),
        (PORT_ACPI_SLEEP, 2),
        (PORT_PCI_RESET, 1),
    ];
}

impl MmioDevice for PowerPorts {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_map_to_events() {
        assert_eq!(power_event(0x601, &[1]), Some(PowerEvent::Reset));
        assert_eq!(power_event(0x601, &[0]), None);
        assert_eq!(power_event(0x600, &[0x34]), Some(PowerEvent::PowerOff));
        // Clearing the wake status is not a sleep request.
        assert_eq!(power_event(0x600, &[0x80]), None);
        assert_eq!(power_event(0x64, &[0xfe]), Some(PowerEvent::Reset));
        assert_eq!(power_event(0x64, &[0xd1]), None);
        assert_eq!(power_event(0xcf9, &[0x06]), Some(PowerEvent::Reset));
        assert_eq!(power_event(0xcf9, &[0x02]), None);
        assert_eq!(power_event(0x3f8, &[0xfe]), None);
        assert_eq!(power_event(0x64, &[]), None);
    }
}
