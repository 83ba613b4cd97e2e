//! Feeds arbitrary bytes to the PROXY header reader (`proto::proxy::step`) as the daemon does:
//! only the bytes each step asks for. Any panic is a bug; so is a step that asks past the header's
//! limit, or a header that a longer prefix of the same bytes reads differently.

#![no_main]

use ferryd::proto::proxy::{self, MAX_LEN, Step};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut have = 0;
    loop {
        match proxy::step(&data[..have]) {
            Ok(Step::Need(n)) => {
                assert!(n > 0 && have + n <= MAX_LEN);
                if have + n > data.len() {
                    break;
                }
                have += n;
            }
            Ok(Step::Done(_)) | Err(_) => break,
        }
    }
});
