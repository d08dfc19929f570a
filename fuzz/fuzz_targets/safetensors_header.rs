//! Drives the safetensors header reader (`parse_header`, `header_len`) with
//! arbitrary bytes. The input is an 8-byte control word followed by the
//! file's bytes: the file is parsed once with its own length and once with
//! a length the control word picks (shorter, longer, raw or near
//! `u64::MAX`), as a file whose data was only partly read, or truncated.
//!
//! Asserts: no panic; `header_len` agrees with `parse_header`; on success
//! `data_start` is `8 + L` and lies in the file, names are unique, every
//! tensor's range is `numel x dtype size` bytes inside the data section,
//! and tensors are sorted by start and do not overlap. Every accepted header
//! round-trips: `write_header` of its names, dtypes, shapes and metadata
//! parses back (with zeroed data) to the same tensors, in the same order,
//! at the offsets `write_header` reported, with the data 8-byte aligned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medley_merge::safetensors::{Header, OutTensor, header_len, parse_header, write_header};

/// Round trips append real zeroed data up to this size, and beyond it
/// only claim it through `file_len` (the reader never touches the data).
const MAX_MATERIALIZED: u64 = 1 << 20;

fn check(file: &[u8], file_len: u64) {
    let hl = header_len(file, file_len);
    let res = parse_header(file, file_len);
    if let Err(e) = &res {
        assert!(!e.to_string().is_empty());
    }
    let Ok(h) = res else { return };
    let l = hl.expect("parse_header accepted a header header_len rejects");
    assert_eq!(l, u64::from_le_bytes(file[..8].try_into().unwrap()));
    assert_eq!(h.data_start, 8 + l);
    assert!(h.data_start <= file_len);
    check_tensors(&h, file_len);
    round_trip(&h);
}

fn check_tensors(h: &Header, file_len: u64) {
    let data_len = file_len - h.data_start;
    let mut names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    assert!(names.windows(2).all(|w| w[0] != w[1]), "duplicate tensor names");
    assert!(!names.contains(&"__metadata__"));
    for t in &h.tensors {
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .expect("accepted shape overflows");
        assert_eq!(numel as usize, t.numel());
        let bytes = numel.checked_mul(t.dtype.size() as u64).expect("accepted byte size overflows");
        assert!(t.start <= t.end, "{t:?}");
        assert_eq!(t.end - t.start, bytes, "{t:?}");
        assert!(t.end <= data_len, "{t:?} past the {data_len}-byte data section");
    }
    for w in h.tensors.windows(2) {
        assert!(w[0].start <= w[1].start, "not sorted: {:?} {:?}", w[0], w[1]);
        assert!(w[0].end <= w[1].start, "overlap: {:?} {:?}", w[0], w[1]);
    }
}

fn round_trip(h: &Header) {
    let outs: Vec<OutTensor> = h
        .tensors
        .iter()
        .map(|t| OutTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() })
        .collect();
    let total: u64 = h.tensors.iter().map(|t| t.end - t.start).sum();
    let (mut bytes, offsets) = write_header(&outs, &h.metadata);
    assert_eq!(offsets.len(), outs.len());
    assert_eq!((bytes.len() - 8) % 8, 0, "data section not 8-byte aligned");
    let head = bytes.len() as u64;
    if total <= MAX_MATERIALIZED {
        bytes.resize(bytes.len() + total as usize, 0);
    }
    let h2 = match parse_header(&bytes, head + total) {
        Ok(h2) => h2,
        Err(e) => panic!("written header does not parse back: {e}\n{}", String::from_utf8_lossy(&bytes[..head as usize])),
    };
    assert_eq!(h2.data_start, head);
    assert_eq!(h2.metadata, h.metadata);
    assert_eq!(h2.tensors.len(), h.tensors.len());
    for ((a, b), &off) in h.tensors.iter().zip(&h2.tensors).zip(&offsets) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.dtype, b.dtype);
        assert_eq!(a.shape, b.shape);
        assert_eq!(b.start, off);
        assert_eq!(b.end - b.start, a.end - a.start);
    }
    if let Some(last) = h2.tensors.last() {
        assert!(last.end <= total);
    }
}

fuzz_target!(|data: &[u8]| {
    let (ctl, file) = if data.len() >= 8 { data.split_at(8) } else { (&[0u8; 8][..], data) };
    let n = file.len() as u64;
    let small = u32::from_le_bytes(ctl[1..5].try_into().unwrap()) as u64;
    let mut raw = [0u8; 8];
    raw[..7].copy_from_slice(&ctl[1..8]);
    let other = match ctl[0] % 6 {
        0 => n.saturating_sub(small % (n + 1)),
        1 => n.saturating_add(small),
        2 => n.saturating_add(small << 24),
        3 => u64::from_le_bytes(raw),
        4 => u64::MAX - (ctl[1] as u64),
        _ => small % 16,
    };
    // header_len alone, on every prefix length it may see.
    let _ = header_len(&file[..file.len().min(8)], other);
    check(file, n);
    check(file, other);
});
