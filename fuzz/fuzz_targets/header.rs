//! Feeds arbitrary bytes to the frame parsers: the header, the name rules, the answer-line parser
//! and the text/frame splitter. Any panic is a bug; so is a header that parses but does not
//! encode back to the same bytes.

#![no_main]

use ferryd::proto::{self, Header, Parsed, name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete(h)) = Header::parse(data) {
        assert_eq!(h.encode()[..], data[..proto::HEADER_LEN]);
        let rest = &data[proto::HEADER_LEN..];
        let _ = name::validate(&rest[..rest.len().min(usize::from(h.name_len))]);
    }
    let _ = name::validate(data);
    assert!(proto::text_len(data, true) <= data.len());
    assert!(proto::text_len(data, false) <= data.len());
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = proto::wire::parse_answer(text);
    }
});
