//! Fuzz target: see `checks::socket_auth`.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::socket_auth(data));
