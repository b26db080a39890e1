//! The payload guests built into the ftvmm binary (built from `guest/` by `build.rs`), so that
//! `--payload builtin:NAME` needs no file.

/// Names of the builtin payloads.
pub const NAMES: &[&str] = &["seq", "stencil", "kv", "journal", "idle"];

static SEQ: &[u8] = include_bytes!(concat!(env!("FTVMM_PAYLOAD_DIR"), "/seq"));
static STENCIL: &[u8] = include_bytes!(concat!(env!("FTVMM_PAYLOAD_DIR"), "/stencil"));
static KV: &[u8] = include_bytes!(concat!(env!("FTVMM_PAYLOAD_DIR"), "/kv"));
static JOURNAL: &[u8] = include_bytes!(concat!(env!("FTVMM_PAYLOAD_DIR"), "/journal"));
static IDLE: &[u8] = include_bytes!(concat!(env!("FTVMM_PAYLOAD_DIR"), "/idle"));

/// The ELF image of the builtin payload `name`, if there is one.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    match name {
        "seq" => Some(SEQ),
        "stencil" => Some(STENCIL),
        "kv" => Some(KV),
        "journal" => Some(JOURNAL),
        "idle" => Some(IDLE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_a_static_elf() {
        for name in NAMES {
            let elf = builtin(name).expect("listed payload exists");
            assert_eq!(&elf[..4], b"\x7fELF", "{name}");
            assert_eq!(elf[4], 2, "{name} is ELF64");
            assert_eq!(
                u16::from_le_bytes([elf[16], elf[17]]),
                2,
                "{name} is ET_EXEC (not PIE)"
            );
        }
        assert!(builtin("nope").is_none());
    }
}
