//! Feeds arbitrary bytes to the frame parsers: the whole frame head (header, name, tag), the name
//! rules, the answer-line parser and the text/frame splitter. Any panic is a bug; so is a head
//! that parses but does not match its own bytes, or one whose prefixes disagree with it.

#![no_main]

use ferryd::proto::{self, FrameHead, Header, Parsed, name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete(h)) = Header::parse(data) {
        assert_eq!(h.encode()[..], data[..proto::HEADER_LEN]);
    }
    match FrameHead::parse(data) {
        Ok(Parsed::Complete(head)) => {
            assert!(head.len <= data.len() && head.len <= proto::MAX_HEAD_LEN);
            assert_eq!(head.raw_header[..], data[..proto::HEADER_LEN]);
            assert_eq!(head.name.len(), usize::from(head.header.name_len));
            assert_eq!(head.tag.is_some(), head.header.authenticated);
            let _ = name::validate(head.name);
            // Every shorter prefix of a complete head is partial: the parser never decides early.
            for len in 0..head.len {
                assert_eq!(FrameHead::parse(&data[..len]), Ok(Parsed::Partial));
            }
        }
        Ok(Parsed::Partial) => assert!(data.len() < proto::MAX_HEAD_LEN),
        Err(e) => {
            // An error stays an error however many more bytes arrive.
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0u8; 64]);
            assert_eq!(FrameHead::parse(&longer), Err(e));
        }
    }
    let _ = name::validate(data);
    assert!(proto::text_len(data, true) <= data.len());
    assert!(proto::text_len(data, false) <= data.len());
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = proto::wire::parse_answer(text);
    }
});
