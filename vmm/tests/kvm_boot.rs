//! Boots hand-assembled payloads under KVM: CPL3 entry, string I/O to the UART, exit and park
//! ports, SMP entry, and fault reporting.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmm::builder::HostIo;
use vmm::devices::ConsoleSink;
use vmm::{VmConfig, VmOutcome, Vmm};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl ConsoleSink for Capture {
    fn write_console(&mut self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

const LOAD: u64 = 0x40_0000;

/// A static x86-64 ELF with `code` at LOAD, entry at LOAD.
fn elf(code: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 120];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&62u16.to_le_bytes());
    e[24..32].copy_from_slice(&LOAD.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let n = code.len() as u64;
    let ph = &mut e[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&LOAD.to_le_bytes());
    ph[24..32].copy_from_slice(&LOAD.to_le_bytes());
    ph[32..40].copy_from_slice(&n.to_le_bytes());
    ph[40..48].copy_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    e
}

fn run(code: &[u8], vcpus: u32) -> (VmOutcome, Vec<u8>) {
    let cap = Capture::default();
    let config = VmConfig {
        mem_size: 64 << 20,
        vcpus,
        args: vec![],
    };
    let io = HostIo {
        kvm_path: PathBuf::from("/dev/kvm"),
        console: Box::new(cap.clone()),
        disk: None,
        net: None,
    };
    let mut vmm = Vmm::boot_payload(&config, &elf(code), io).expect("boot");
    vmm.start().expect("start");
    let outcome = vmm.wait();
    let out = cap.0.lock().unwrap().clone();
    (outcome, out)
}

// mov dx, 0x501; mov eax, imm32; out dx, eax
fn exit_with(code: u32) -> Vec<u8> {
    let mut v = vec![0x66, 0xba, 0x01, 0x05, 0xb8];
    v.extend_from_slice(&code.to_le_bytes());
    v.push(0xef);
    v
}

#[test]
fn cpl3_payload_writes_the_uart_and_exits_with_its_code() {
    // lea rsi, [rip+msg]; mov ecx, len; mov dx, 0x3f8; rep outsb; <exit 7>; msg: "hi from cpl3\n"
    let msg = b"hi from cpl3\n";
    let mut code = vec![0x48, 0x8d, 0x35, 0, 0, 0, 0];
    code.extend_from_slice(&[0xb9]);
    code.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xf3, 0x6e]);
    code.extend(exit_with(7));
    let rel = (code.len() - 7) as u32;
    code[3..7].copy_from_slice(&rel.to_le_bytes());
    code.extend_from_slice(msg);
    let (outcome, out) = run(&code, 1);
    assert_eq!(outcome, VmOutcome::Exited(7));
    assert_eq!(out, msg);
}

#[test]
fn every_vcpu_enters_with_its_id_and_parks() {
    // rsi = vCPU id: out 0x3f8, ('0' + id); then park (out 0x502).
    let code = [
        0x48, 0x8d, 0x46, 0x30, // lea rax, [rsi+0x30]
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0x66, 0xba, 0x02, 0x05, // mov dx, 0x502
        0xee, // out dx, al
        0xeb, 0xfe, // jmp $
    ];
    let (outcome, mut out) = run(&code, 2);
    assert_eq!(outcome, VmOutcome::Exited(0));
    out.sort();
    assert_eq!(out, b"01");
}

#[test]
fn a_triple_fault_is_reported_with_registers() {
    // ud2 with no IDT: the CPU cannot deliver #UD and shuts down.
    let (outcome, _) = run(&[0x0f, 0x0b], 1);
    match outcome {
        VmOutcome::Fault(text) => {
            assert!(text.contains("vCPU 0"), "{text}");
            assert!(text.contains("rip=0x40000"), "{text}");
        }
        other => panic!("expected a fault, got {other:?}"),
    }
}
