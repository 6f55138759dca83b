//! Any bytes as a pickle stream: a value or an error naming what was refused, nothing executed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ldm_web::loader::pickle::unpickle(data, "fuzz.pkl");
});
