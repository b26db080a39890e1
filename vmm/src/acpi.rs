//! ACPI tables for Linux guests (rust-vmm's acpi_tables): RSDP, XSDT, a hardware-reduced FADT
//! (reset and sleep registers on ftvmm's power ports), a MADT with every vCPU's LAPIC and the
//! IOAPIC, and a DSDT naming the 16550 (PNP0501) and each virtio-mmio device (LNRO0005) with
//! its window and interrupt, so that a kernel whose virtio_mmio is a module finds them.
//!
//! The tables live in the reserved BIOS area at 0xe0000 (where Linux also scans for the RSDP
//! when no boot protocol hands it the address).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::cast::usize_to_u64;
use crate::devices::power::{PORT_ACPI_RESET, PORT_ACPI_SLEEP, RESET_VALUE, SLP_TYP_S5};
use crate::devices::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) overflow the BIOS area")]
    TooLarge(u64),
    #[error("too many vCPUs for the MADT: {0}")]
    TooManyVcpus(u32),
    #[error("virtio-mmio window {base:#x} ({size:#x} bytes) is not below 4 GiB")]
    WindowAbove4G { base: u64, size: u64 },
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The RSDP's address, 16-byte aligned in the BIOS area.
pub const RSDP_ADDR: u64 = 0xe_0000;
const TABLES_END: u64 = 0x10_0000;
const OEM_ID: [u8; 6] = *b"FTVMM ";
const OEM_REVISION: u32 = 1;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The COM1 UART's ISA IRQ.
pub const UART_IRQ: u32 = 4;
/// IAPC_BOOT_ARCH: no VGA, no MSI, no CMOS RTC (bits 2, 3, 5).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 5);

/// A virtio-mmio device the DSDT describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

fn table_id(name: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"FTVM    ";
    id[4..].copy_from_slice(name);
    id
}

fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, UART_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &com1_hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    for (uid, d) in (0u32..).zip(devices) {
        let above_4g = || AcpiError::WindowAbove4G {
            base: d.base,
            size: d.size,
        };
        let window = aml::Memory32Fixed::new(
            true,
            u32::try_from(d.base).map_err(|_| above_4g())?,
            u32::try_from(d.size).map_err(|_| above_4g())?,
        );
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        aml::Device::new(
            format!("_SB_.V{uid:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    // S5 (soft off) through the FADT's sleep control register.
    let s5 = aml::Package::new(vec![&SLP_TYP_S5]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_gas(PORT_ACPI_RESET);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_gas(PORT_ACPI_SLEEP);
    fadt.sleep_status_reg = io_gas(PORT_ACPI_SLEEP);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"FTVMM\0\0\0").into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn madt(vcpus: u32) -> Result<Vec<u8>, AcpiError> {
    let count = u8::try_from(vcpus).map_err(|_| AcpiError::TooManyVcpus(vcpus))?;
    let mut madt = MADT::new(
        OEM_ID,
        table_id(b"APIC"),
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..count {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    Ok(bytes)
}

/// Writes every table for a VM of `vcpus` vCPUs with `devices`; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u32,
    devices: &[MmioDevice],
) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let mut next = align(RSDP_ADDR + usize_to_u64(Rsdp::len()));
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        next = align(at + usize_to_u64(bytes.len()));
        if next > TABLES_END {
            return Err(AcpiError::TooLarge(next - RSDP_ADDR));
        }
        mem.write_slice(bytes, GuestAddress(at))?;
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(devices)?)?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(vcpus)?)?;
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, GuestAddress(RSDP_ADDR))?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn read(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let mut head = [0u8; 8];
        mem.read_slice(&mut head, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    #[test]
    fn tables_chain_and_checksum() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let devices = [
            MmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        let rsdp_addr = write_tables(&mem, 2, &devices).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(&rsdp[9..15], b"FTVMM ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt = read(&mem, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = read(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(&fadt), 0);
        // Hardware-reduced (flags bit 20).
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read(&mem, x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(&dsdt), 0);
        let text = String::from_utf8_lossy(&dsdt);
        assert_eq!(text.matches("LNRO0005").count(), 2);
        let madt = read(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(&madt), 0);
        // Header 44 bytes, two LAPICs (8 each) and an IOAPIC (12).
        assert_eq!(madt.len(), 44 + 16 + 12);
    }
}
