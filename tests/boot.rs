//! Hand-assembled payloads pin down the boot contract: CPL3 entry with port access to the
//! UART, the exit port's code becoming ftvmm's exit status, and every vCPU entering with its id
//! and parking.

mod common;

use std::time::Duration;

use common::*;

const LOAD: u64 = 0x40_0000;
const LIMIT: Duration = Duration::from_secs(30);

fn run_code(tag: &str, code: &[u8], vcpus: &str) -> std::process::Output {
    let s = Scratch::new(tag);
    let p = s.path("payload");
    write_file(&p, &elf_with_code(code, LOAD));
    ftvmm(
        &["run", "--vcpus", vcpus, "--payload", p.to_str().unwrap()],
        LIMIT,
    )
}

#[test]
fn cpl3_code_writes_the_uart_and_its_exit_code_is_ftvmms() {
    // lea rsi, [rip+msg]; mov ecx, len; mov dx, 0x3f8; rep outsb;
    // mov dx, 0x501; mov eax, 7; out dx, eax; msg: "hi from cpl3\n"
    let msg = b"hi from cpl3\n";
    let mut code = vec![0x48, 0x8d, 0x35, 0, 0, 0, 0, 0xb9];
    code.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xf3, 0x6e]);
    code.extend_from_slice(&[0x66, 0xba, 0x01, 0x05, 0xb8, 7, 0, 0, 0, 0xef]);
    let rel = u32::try_from(code.len() - 7).unwrap();
    code[3..7].copy_from_slice(&rel.to_le_bytes());
    code.extend_from_slice(msg);
    let out = run_code("uart", &code, "1");
    assert_eq!(out.status.code(), Some(7), "{}", stderr_of(&out));
    assert_eq!(out.stdout, msg);
}

#[test]
fn every_vcpu_enters_with_its_id_and_the_vm_ends_when_all_park() {
    let code = [
        0x48, 0x8d, 0x46, 0x30, // lea rax, [rsi+'0']: rsi holds the vCPU id
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
        0x66, 0xba, 0x02, 0x05, // mov dx, 0x502 (park)
        0xee, // out dx, al
        0xeb, 0xfe, // jmp $
    ];
    let out = run_code("park", &code, "4");
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let mut ids = out.stdout.clone();
    ids.sort();
    assert_eq!(ids, b"0123");
}

/// Prints "r\n" on the UART, then resets the machine through the i8042 (`reboot=k`).
const RESETTING: [u8; 16] = [
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'r', 0xee, // mov al, 'r'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xeb, 0xfe, // jmp $
];

#[test]
fn a_guest_reset_ends_the_vm() {
    let out = run_code("reset", &RESETTING, "1");
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(out.stdout, b"r\n");
    assert!(stderr_of(&out).contains("the guest rebooted"));
}

#[test]
fn a_guest_reset_restarts_the_vm_when_asked() {
    let s = Scratch::new("restart");
    let (p, console) = (s.path("payload"), s.path("console"));
    write_file(&p, &elf_with_code(&RESETTING, LOAD));
    let mut vm = Node::spawn(&[
        "run".to_string(),
        "--on-reboot=restart".into(),
        format!("--console=file:{}", console.display()),
        format!("--payload={}", p.display()),
    ]);
    // Each boot prints its line once, one after the other in the same console stream.
    let rebooted = wait_for(LIMIT, || {
        std::fs::read(&console)
            .unwrap_or_default()
            .starts_with(b"r\nr\nr\n")
            || !vm.running()
    });
    assert!(rebooted && vm.running(), "{}", vm.stderr());
    let err = ftvmm(
        &[
            "primary",
            "--peer",
            "127.0.0.1:1",
            "--on-reboot=restart",
            "--payload",
            "builtin:seq",
        ],
        LIMIT,
    );
    assert!(stderr_of(&err).contains("not supported for a replicated guest"));
}
