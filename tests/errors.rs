//! Bad input gets one clear line on stderr and a non-zero exit, never a panic or a hang.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// Runs ftvmm expecting failure with `status`; returns its stderr after checking it is a
/// single `ftvmm: ...` line (tracing may add nothing at the default level).
fn fails(args: &[&str], status: i32) -> String {
    let out = ftvmm(args, LIMIT);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(status), "stderr: {err}");
    assert!(!err.contains("panicked"), "ftvmm panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("ftvmm: "), "{err}");
    err
}

#[test]
fn missing_kvm_device() {
    let err = fails(
        &[
            "run",
            "--kvm-device",
            "/nonexistent/kvm",
            "--payload",
            "builtin:seq",
            "--",
            "1",
        ],
        EXIT_FTVMM_ERROR,
    );
    assert!(err.contains("cannot open /nonexistent/kvm"), "{err}");
}

#[test]
fn unusable_kvm_device() {
    // A file that is not KVM: opening works, the KVM ioctls do not.
    let s = Scratch::new("badkvm");
    let fake = s.path("kvm");
    write_file(&fake, b"");
    let err = fails(
        &[
            "run",
            "--kvm-device",
            fake.to_str().unwrap(),
            "--payload",
            "builtin:seq",
            "--",
            "1",
        ],
        EXIT_FTVMM_ERROR,
    );
    assert!(err.contains("not a usable KVM device"), "{err}");
}

#[test]
fn not_an_elf() {
    let s = Scratch::new("notelf");
    let p = s.path("payload");
    write_file(&p, b"#!/bin/sh\necho hello\n");
    let err = fails(&["run", "--payload", p.to_str().unwrap()], EXIT_FTVMM_ERROR);
    assert!(err.contains("not an ELF"), "{err}");
}

#[test]
fn elf_of_the_wrong_kind() {
    let s = Scratch::new("wrongelf");
    let p = s.path("payload");
    let mut e = elf_with_code(&[0xeb, 0xfe], 0x40_0000);
    e[4] = 1; // ELFCLASS32
    write_file(&p, &e);
    let err = fails(&["run", "--payload", p.to_str().unwrap()], EXIT_FTVMM_ERROR);
    assert!(err.contains("not a 64-bit"), "{err}");
    let mut e = elf_with_code(&[0xeb, 0xfe], 0x40_0000);
    e[18] = 183; // aarch64
    write_file(&p, &e);
    let err = fails(&["run", "--payload", p.to_str().unwrap()], EXIT_FTVMM_ERROR);
    assert!(err.contains("machine is not x86-64"), "{err}");
}

#[test]
fn segments_outside_guest_memory() {
    let s = Scratch::new("bigseg");
    let p = s.path("payload");
    // Loads at 1 GiB in a 256 MiB guest.
    write_file(&p, &elf_with_code(&[0xeb, 0xfe], 0x4000_0000));
    let err = fails(&["run", "--payload", p.to_str().unwrap()], EXIT_FTVMM_ERROR);
    assert!(err.contains("outside guest RAM"), "{err}");
}

#[test]
fn impossible_memory_sizes() {
    for mem in ["1M", "65G", "100T", "12X", "257M"] {
        let out = ftvmm(
            &["run", "--mem", mem, "--payload", "builtin:seq", "--", "1"],
            LIMIT,
        );
        let err = stderr_of(&out);
        assert_ne!(out.status.code(), Some(0), "--mem {mem} accepted");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains("size"), "--mem {mem}: {err}");
    }
}

#[test]
fn unknown_builtin() {
    let err = fails(&["run", "--payload", "builtin:nope"], EXIT_FTVMM_ERROR);
    assert!(err.contains("unknown builtin payload 'nope'"), "{err}");
    assert!(err.contains("seq"), "lists the builtins: {err}");
}

#[test]
fn missing_payload_file() {
    let err = fails(
        &["run", "--payload", "/nonexistent/payload"],
        EXIT_FTVMM_ERROR,
    );
    assert!(
        err.contains("cannot read payload /nonexistent/payload"),
        "{err}"
    );
}

#[test]
fn guest_triple_fault_reports_registers() {
    let s = Scratch::new("fault");
    let p = s.path("payload");
    // mov rax, 0x1234; ud2 (no IDT: the #UD cannot be delivered and the vCPU shuts down)
    let code = [0x48, 0xc7, 0xc0, 0x34, 0x12, 0, 0, 0x0f, 0x0b];
    write_file(&p, &elf_with_code(&code, 0x40_0000));
    let err = fails(&["run", "--payload", p.to_str().unwrap()], EXIT_GUEST_FAULT);
    assert!(err.contains("triple fault"), "{err}");
    assert!(err.contains("rip=0x400007"), "{err}");
    assert!(err.contains("rax=0x1234"), "{err}");
}

#[test]
fn a_tap_that_cannot_be_created() {
    let err = fails(
        &[
            "run",
            "--net",
            "tap=this-name-is-far-too-long",
            "--payload",
            "builtin:seq",
            "--",
            "1",
        ],
        EXIT_FTVMM_ERROR,
    );
    assert!(err.contains("this-name-is-far-too-long"), "{err}");
    let tap = format!("ftnb{}", std::process::id());
    let err = fails(
        &[
            "run",
            "--net",
            &format!("tap={tap},bridge=ftnobridge0"),
            "--payload",
            "builtin:seq",
        ],
        EXIT_FTVMM_ERROR,
    );
    assert!(err.contains("ftnobridge0"), "{err}");
}

#[test]
fn payload_and_kernel_together_or_neither() {
    let err = fails(
        &[
            "run",
            "--payload",
            "builtin:seq",
            "--kernel",
            "/boot/vmlinuz",
        ],
        EXIT_FTVMM_ERROR,
    );
    assert!(
        err.contains("either --payload or --kernel, not both"),
        "{err}"
    );
    let err = fails(&["run", "--mem", "128M"], EXIT_FTVMM_ERROR);
    assert!(err.contains("--payload or --kernel"), "{err}");
    let err = fails(
        &["run", "--payload", "builtin:seq", "--cmdline", "quiet"],
        EXIT_FTVMM_ERROR,
    );
    assert!(err.contains("need --kernel"), "{err}");
}

#[test]
fn missing_kernel_file() {
    let err = fails(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        EXIT_FTVMM_ERROR,
    );
    assert!(
        err.contains("cannot read kernel /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn not_a_kernel() {
    let s = Scratch::new("notkernel");
    let p = s.path("vmlinuz");
    write_file(&p, b"#!/bin/sh\necho hello\n");
    let err = fails(&["run", "--kernel", p.to_str().unwrap()], EXIT_FTVMM_ERROR);
    assert!(
        err.contains("neither an ELF vmlinux nor a bzImage"),
        "{err}"
    );
    // An ELF without the PVH note (a payload) is refused as a kernel.
    write_file(&p, &elf_with_code(&[0xeb, 0xfe], 0x40_0000));
    let err = fails(&["run", "--kernel", p.to_str().unwrap()], EXIT_FTVMM_ERROR);
    assert!(err.contains("without a PVH entry note"), "{err}");
}

#[test]
fn missing_initrd_and_long_cmdline() {
    let s = Scratch::new("badinitrd");
    let p = s.path("vmlinux");
    write_file(&p, &elf_with_code(&[0xeb, 0xfe], 0x40_0000));
    let k = p.to_str().unwrap();
    let err = fails(
        &["run", "--kernel", k, "--initrd", "/nonexistent/initrd"],
        EXIT_FTVMM_ERROR,
    );
    assert!(
        err.contains("cannot read initrd /nonexistent/initrd"),
        "{err}"
    );
    let long = "x".repeat(3000);
    let err = fails(
        &["run", "--kernel", k, "--cmdline", &long],
        EXIT_FTVMM_ERROR,
    );
    assert!(err.contains("command line is 3000 bytes"), "{err}");
}

#[test]
fn an_ack_timeout_not_longer_than_the_failover_timeout() {
    // Checked before anything starts: no standby is needed to refuse it.
    let err = fails(
        &[
            "primary",
            "--peer",
            "127.0.0.1:9",
            "--failover-timeout-ms",
            "500",
            "--ack-timeout-ms",
            "500",
            "--payload",
            "builtin:seq",
            "--",
            "1",
        ],
        EXIT_FTVMM_ERROR,
    );
    assert!(
        err.contains("--ack-timeout-ms (500) must be longer than --failover-timeout-ms (500)"),
        "{err}"
    );
}

/// A pair config in `s` whose nodes' sockets are in `s` (and nothing listens on them).
fn pair_config(s: &Scratch) -> std::path::PathBuf {
    let config = s.path("pair.toml");
    let text = "[nodes.a]\ncontrol = \"127.0.0.1:7701\"\nreplication = \"127.0.0.1\"\n\
                socket = \"a.sock\"\n\n[nodes.b]\ncontrol = \"127.0.0.1:7702\"\n\
                replication = \"127.0.0.1\"\nsocket = \"b.sock\"\n";
    write_file(&config, text.as_bytes());
    config
}

#[test]
fn status_of_an_unknown_node() {
    let s = Scratch::new("status-unknown");
    let config = pair_config(&s);
    let config = config.to_str().unwrap();
    let err = fails(
        &["status", "--config", config, "--name", "c"],
        EXIT_FTVMM_ERROR,
    );
    assert!(
        err.contains(&format!("{config}: no node \"c\" (nodes: a, b)")),
        "{err}"
    );
}

#[test]
fn status_with_no_node_listening() {
    let s = Scratch::new("status-silent");
    let config = pair_config(&s);
    let err = fails(
        &[
            "status",
            "--config",
            config.to_str().unwrap(),
            "--name",
            "b",
        ],
        EXIT_FTVMM_ERROR,
    );
    let socket = s.path("b.sock");
    assert!(
        err.contains(&format!("no node is listening at {}", socket.display())),
        "{err}"
    );
    assert!(err.contains("is `ftvmm node --name b` running?"), "{err}");
}

/// `ftvmm node` with `extra` appended to a valid pair config fails before it starts anything,
/// with one line; returns it.
fn node_fails(tag: &str, extra: &str, name: &str) -> String {
    let s = Scratch::new(tag);
    let config = pair_config(&s);
    let text = std::fs::read_to_string(&config).unwrap() + extra;
    write_file(&config, text.as_bytes());
    let err = fails(
        &["node", "--config", config.to_str().unwrap(), "--name", name],
        EXIT_FTVMM_ERROR,
    );
    assert!(!s.path("a").exists(), "the node started: {err}");
    err
}

#[test]
fn node_config_errors_name_their_key() {
    let err = node_fails("node-key", "[policy]\nfailback_dealy = \"5s\"\n", "a");
    assert!(
        err.trim_end()
            .ends_with("unknown key policy.failback_dealy"),
        "{err}"
    );
    let err = node_fails("node-value", "[policy]\nepoch_ms = 0\n", "a");
    assert!(err.contains("policy.epoch_ms"), "{err}");
    let err = node_fails("node-name", "", "c");
    assert!(err.contains("no node \"c\" (nodes: a, b)"), "{err}");
}

#[test]
fn a_node_whose_disk_is_missing_names_it() {
    let vm = "[[vm]]\nname = \"s\"\npayload = \"builtin:stencil\"\n\
              [vm.nodes.a]\ndisk = \"/nonexistent/a.img\"\n[vm.nodes.b]\ndisk = \"b.img\"\n";
    let err = node_fails("node-disk", vm, "a");
    assert!(
        err.contains("vm \"s\": nodes.a.disk: /nonexistent/a.img: No such file or directory"),
        "{err}"
    );
}

#[test]
fn a_node_whose_control_address_is_not_local_names_it() {
    let s = Scratch::new("node-addr");
    let config = s.path("pair.toml");
    let text = "[nodes.a]\ncontrol = \"192.0.2.99:7701\"\nreplication = \"127.0.0.1\"\n\
                socket = \"a.sock\"\nstate_dir = \"a\"\n\n[nodes.b]\ncontrol = \"127.0.0.1:7702\"\n\
                replication = \"127.0.0.1\"\nsocket = \"b.sock\"\n";
    write_file(&config, text.as_bytes());
    let err = fails(
        &["node", "--config", config.to_str().unwrap(), "--name", "a"],
        EXIT_FTVMM_ERROR,
    );
    assert!(
        err.contains("nodes.a.control = 192.0.2.99:7701: cannot listen"),
        "{err}"
    );
}
