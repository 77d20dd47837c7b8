//! The kernel parser's twin on arbitrary bytes: it never panics, and when
//! it and hickory both accept a message they read the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|message: &[u8]| {
    if let Err(disagreement) = tollgate_dns::check_twin_agrees(message) {
        panic!("{disagreement}");
    }
});
