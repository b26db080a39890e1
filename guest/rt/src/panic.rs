//! Panics print `panic: <message> at <file>:<line>` and end the VM with exit code 101.
use core::panic::PanicInfo;

/// The exit code of a panicking payload (as Rust's test harness uses).
pub const PANIC_EXIT_CODE: u32 = 101;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    match info.location() {
        Some(loc) => crate::console::emergency(format_args!(
            "panic: {} at {}:{}\n",
            info.message(),
            loc.file(),
            loc.line()
        )),
        None => crate::console::emergency(format_args!("panic: {}\n", info.message())),
    }
    crate::start::exit(PANIC_EXIT_CODE)
}
