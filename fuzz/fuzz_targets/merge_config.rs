//! Drives `MergeConfig::parse` (the YAML reader and mergekit's schema) with
//! arbitrary text (bytes read as UTF-8, invalid sequences replaced).
//! Asserts: no panic and no hang (the depth and alias-expansion guards);
//! every error has a non-empty message and a real position (line and
//! column from 1).
#![no_main]

use libfuzzer_sys::fuzz_target;
use medley_merge::MergeConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match MergeConfig::parse(&text) {
        Ok(c) => {
            let _ = format!("{c:?}");
        }
        Err(e) => {
            let s = e.to_string();
            assert!(!s.is_empty());
            assert!(!e.message.is_empty(), "empty message: {s}");
            assert!(e.pos.line >= 1, "error at line {}: {s}", e.pos.line);
            assert!(e.pos.col >= 1, "error at column {}: {s}", e.pos.col);
        }
    }
});
