//! Drives the C entry points of medley-ffi exactly as C does: raw pointers
//! that are real, null, misaligned or paired with lengths whose byte size
//! overflows; shapes (rows, lengths, strides, k, model counts) from tiny to
//! `usize::MAX`; arbitrary integer enum values and parameters. Every buffer
//! claimed to have `n` elements really has at least `n` (the only thing a C
//! caller must get right), followed by a guard tail.
//!
//! Asserts: no crash and no panic (libfuzzer-sys aborts on any panic, even
//! one the boundary would catch); the status is a known code; a failed call
//! writes nothing; no call writes beyond the lengths it was given; status
//! names and messages are valid C strings.
#![no_main]

use core::ffi::{CStr, c_char};
use core::ptr::{null, null_mut};
use libfuzzer_sys::fuzz_target;
use medley_ffi::*;

/// A `struct_size` for a versioned struct held in a local of `full` bytes:
/// mostly `full`, sometimes its first layout `v1`, sometimes anything up to
/// `full` (refused unless it is a published size).
fn size_field(r: &mut Bytes<'_>, full: usize, v1: usize) -> usize {
    match r.u8() % 16 {
        0 => r.below(full + 1),
        1 => v1,
        _ => full,
    }
}

#[path = "ffi_moe.rs"]
mod ffi_moe;

#[path = "ffi_merge.rs"]
mod ffi_merge;

/// A versioned struct filled by its `_init` function at this header's size.
fn init<T>(f: unsafe extern "C" fn(*mut T, usize) -> medley_status) -> T {
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: v is writable for size_of::<T>() bytes.
    assert_eq!(unsafe { f(v.as_mut_ptr(), size_of::<T>()) }, medley_status::Ok);
    // SAFETY: the init function wrote every byte of T (zeroed before).
    unsafe { v.assume_init() }
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.u32() as usize % n }
    }
    /// A size: mostly small, sometimes huge.
    fn size(&mut self) -> usize {
        match self.u8() % 16 {
            0 => usize::MAX,
            1 => usize::MAX / 2 + self.below(1000),
            2 => 1 << (32 + self.below(30)),
            3 => u32::MAX as usize + self.below(3),
            4 => 0,
            _ => self.below(40),
        }
    }
    fn f32(&mut self) -> f32 {
        match self.u8() % 8 {
            0 => f32::from_bits(self.u32()),
            1 => f32::NEG_INFINITY,
            2 => 0.0,
            _ => (self.u8() as i8) as f32 / 8.0,
        }
    }
    fn param(&mut self) -> f32 {
        match self.u8() % 10 {
            0 => f32::from_bits(self.u32()),
            1 => 0.0,
            2 => -1.0,
            _ => (self.u8() as f32 + 1.0) / 64.0,
        }
    }
    fn enum_value(&mut self, valid: u32) -> u32 {
        if self.u8() % 8 == 0 { self.u32() } else { self.below(valid as usize) as u32 }
    }
}

/// Elements past every claimed length, checked untouched after each call.
const GUARD: usize = 8;
const SENTINEL: f32 = 12345.0;

/// A host buffer with its guard tail.
struct Buf<T> {
    v: Vec<T>,
    fill: T,
}

impl<T: Copy + PartialEq + core::fmt::Debug> Buf<T> {
    fn new(n: usize, fill: T) -> Self {
        Buf {
            v: vec![fill; n + GUARD],
            fill,
        }
    }
    /// (pointer, claimed length) for a C argument: real and in bounds,
    /// null with any length, real with an overflowing length, or
    /// misaligned.
    fn arg(&mut self, r: &mut Bytes<'_>) -> (*mut T, usize) {
        let real = self.v.len() - GUARD;
        match r.u8() % 16 {
            0 => (null_mut(), r.size()),
            1 => (
                self.v.as_mut_ptr(),
                isize::MAX as usize / size_of::<T>().max(1) + 1 + r.below(1 << 20),
            ),
            2 if size_of::<T>() > 1 && real > 1 => (
                self.v.as_mut_ptr().cast::<u8>().wrapping_add(1).cast(),
                real - 1,
            ),
            3 => (self.v.as_mut_ptr(), r.below(real + 1)),
            _ => (self.v.as_mut_ptr(), real),
        }
    }
    fn untouched(&self) -> bool {
        self.v.iter().all(|x| *x == self.fill)
    }
    fn guard_intact(&self) -> bool {
        self.v[self.v.len() - GUARD..].iter().all(|x| *x == self.fill)
    }
}

fn known(s: medley_status) {
    let name = unsafe { CStr::from_ptr(medley_status_name(s as i32)) };
    assert_ne!(name.to_bytes(), b"MEDLEY_STATUS_UNKNOWN", "unknown status {s:?}");
    if s == medley_status::Panic {
        panic!("a panic reached the boundary");
    }
}

fn check_message(r: &mut Bytes<'_>) {
    let mut buf = vec![0x55u8 as c_char; 64];
    let len = r.below(65);
    let mut n = 0usize;
    let p = if len == 0 && r.u8() % 2 == 0 { null_mut() } else { buf.as_mut_ptr() };
    let s = unsafe { medley_last_error_message(p, len, &mut n) };
    assert_eq!(s, medley_status::Ok);
    if len > 0 {
        let m = unsafe { CStr::from_ptr(buf.as_ptr()) };
        assert!(m.to_bytes().len() < len && m.to_bytes().len() <= n);
        assert!(m.to_str().is_ok(), "message cut inside a UTF-8 character");
    }
}

/// A host rows descriptor over a fresh buffer of random values and dtype.
fn rows(r: &mut Bytes<'_>, store: &mut Vec<Buf<u32>>) -> medley_rows {
    let dtype = r.enum_value(3);
    let n = r.below(200);
    // Stored as u32 words (4-byte aligned, enough for every dtype).
    let mut b = Buf::new(n, 0u32);
    for w in b.v.iter_mut().take(n) {
        *w = r.f32().to_bits();
    }
    b.fill = 0;
    let (data, words) = b.arg(r);
    let elems = elems(r, words, dtype, usize::MAX);
    let rows_ = if r.u8() % 4 == 0 { r.size() } else { r.below(5) };
    let len = if r.u8() % 4 == 0 { r.size() } else { r.below(40) };
    let stride = match r.u8() % 4 {
        0 => 0,
        1 => r.size(),
        _ => len.saturating_add(r.below(3)),
    };
    store.push(b);
    medley_rows {
        data: data.cast_const().cast(),
        data_len: elems,
        dtype,
        rows: rows_,
        len,
        stride,
    }
}

fn ensemble(r: &mut Bytes<'_>) {
    let mut store = Vec::new();
    let m = if r.u8() % 16 == 0 { 60 + r.below(10) } else { 1 + r.below(4) };
    let mut models: Vec<medley_model> = (0..m)
        .map(|_| medley_model {
            logits: rows(r, &mut store),
            temperature: if r.u8() % 3 == 0 { r.param() } else { 1.0 },
        })
        .collect();
    let (mp, mn) = match r.u8() % 8 {
        0 => (null(), r.size()),
        1 => (models.as_ptr(), usize::MAX / 8 + r.below(100)),
        _ => (models.as_ptr(), r.below(m + 1)),
    };
    let mut wbuf = Buf::new(r.below(12), 0.0f32);
    for w in wbuf.v.iter_mut() {
        *w = r.param();
    }
    let wfill: Vec<u32> = wbuf.v.iter().map(|x| x.to_bits()).collect();
    let (wp, wl) = wbuf.arg(r);
    let b = if r.u8() % 4 == 0 { r.size() } else { r.below(5) };
    let v = if r.u8() % 4 == 0 { r.size() } else { r.below(40) };
    let mut cfg = medley_ensemble_config {
        struct_size: size_field(r, size_of::<medley_ensemble_config>(), MEDLEY_ENSEMBLE_CONFIG_SIZE_V1),
        mode: r.enum_value(2),
        mask_rule: r.enum_value(2),
        out_temperature: if r.u8() % 4 == 0 { r.param() } else { 1.0 },
        plausibility_model: if r.u8() % 3 == 0 { r.below(8) as i32 - 2 } else { -1 },
        plausibility_alpha: r.param(),
        weights: wp,
        weights_len: wl,
        weights_stride: if r.u8() % 3 == 0 { r.size() } else { 0 },
        device_weights: if r.u8() % 16 == 0 { r.u32() as u64 } else { 0 },
    };
    if r.u8() % 32 == 0 {
        cfg.weights = null();
    }
    let n_out = b.min(8).saturating_mul(v.min(64));
    let mut lp = Buf::new(n_out + r.below(4), SENTINEL);
    let mut p = Buf::new(n_out, SENTINEL);
    let mut am = Buf::new(b.min(8), 7u32);
    let mut lz = Buf::new(b.min(8), SENTINEL);
    let mut unc: [Buf<f32>; 4] = std::array::from_fn(|_| Buf::new(b.min(8), SENTINEL));
    let mut out = medley_ensemble_output {
        log_probs: null_mut(),
        log_probs_len: 0,
        log_probs_stride: if r.u8() % 4 == 0 { r.size() } else { 0 },
        probs: null_mut(),
        probs_len: 0,
        probs_stride: if r.u8() % 4 == 0 { r.size() } else { 0 },
        argmax: null_mut(),
        argmax_len: 0,
        log_normalizer: null_mut(),
        log_normalizer_len: 0,
        ..init(medley_ensemble_output_init)
    };
    // Any struct_size up to this layout's (larger ones would read past
    // this local: abi_policy.rs tests them), layout 1 now and then.
    out.struct_size = size_field(r, size_of::<medley_ensemble_output>(), MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1);
    if r.u8() % 4 != 0 {
        (out.log_probs, out.log_probs_len) = lp.arg(r);
    }
    if r.u8() % 2 == 0 {
        (out.probs, out.probs_len) = p.arg(r);
    }
    if r.u8() % 2 == 0 {
        (out.argmax, out.argmax_len) = am.arg(r);
    }
    if r.u8() % 2 == 0 {
        (out.log_normalizer, out.log_normalizer_len) = lz.arg(r);
    }
    let [ue, ut, um, ud] = &mut unc;
    if r.u8() % 4 == 0 {
        (out.entropy, out.entropy_len) = ue.arg(r);
    }
    if r.u8() % 4 == 0 {
        (out.top1_prob, out.top1_prob_len) = ut.arg(r);
    }
    if r.u8() % 4 == 0 {
        (out.margin, out.margin_len) = um.arg(r);
    }
    if r.u8() % 4 == 0 {
        (out.disagreement, out.disagreement_len) = ud.arg(r);
    }
    if r.u8() % 16 == 0 {
        // An output aliasing the first model's logits buffer (in bounds).
        let first = &mut store[0];
        out.log_probs = first.v.as_mut_ptr().cast();
        out.log_probs_len = first.v.len() - GUARD;
    }
    let mut rep = medley_report {
        struct_size: size_field(r, size_of::<medley_report>(), MEDLEY_REPORT_SIZE_V1),
        masked_rows: 99,
        nan_rows: 99,
    };
    let rp = if r.u8() % 4 == 0 { null_mut() } else { &mut rep as *mut _ };
    let cp = if r.u8() % 32 == 0 { null() } else { &cfg as *const _ };
    let op = if r.u8() % 32 == 0 { null() } else { &out as *const _ };
    let s = unsafe { medley_ensemble_combine(mp, mn, cp, b, v, op, rp) };
    known(s);
    if s != medley_status::Ok {
        assert!(lp.untouched() && p.untouched() && am.untouched() && lz.untouched(), "{s:?} wrote");
        assert!(unc.iter().all(|u| u.untouched()), "{s:?} wrote an uncertainty output");
        assert_eq!((rep.masked_rows, rep.nan_rows), (99, 99));
    }
    assert!(lp.guard_intact() && p.guard_intact() && am.guard_intact() && lz.guard_intact());
    assert!(unc.iter().all(|u| u.guard_intact()));
    // Inputs are never written.
    assert!(wbuf.v.iter().map(|x| x.to_bits()).eq(wfill.iter().copied()));
    models.clear();
}

fn gating(r: &mut Bytes<'_>) {
    let mut store = Vec::new();
    let x = rows(r, &mut store);
    let k = if r.u8() % 4 == 0 { r.size() } else { r.below(6) };
    let n = x.rows.min(8).saturating_mul(k.min(8));
    let mut ids = Buf::new(n, 7u32);
    let mut w = Buf::new(n, SENTINEL);
    let (ip, il) = ids.arg(r);
    let (wp, wl) = w.arg(r);
    let xp = if r.u8() % 32 == 0 { null() } else { &x as *const _ };
    let s = unsafe {
        match r.u8() % 3 {
            0 => medley_moe_keep_topk_softmax(xp, k, ip, il, wp, wl, null_mut()),
            _ => medley_moe_topk_softmax(xp, k, r.u32(), ip, il, wp, wl, null_mut()),
        }
    };
    known(s);
    if s != medley_status::Ok {
        assert!(ids.untouched() && w.untouched(), "{s:?} wrote");
    }
    assert!(ids.guard_intact() && w.guard_intact());
}

/// Elements of `dtype` in a claimed length of `l` u32 words from
/// [`Buf::arg`] (at most `n` for 16-bit types, two per word); an
/// overflowing claim stays overflowing for every element size.
fn elems(r: &mut Bytes<'_>, l: usize, dtype: u32, n: usize) -> usize {
    if l > isize::MAX as usize / 4 {
        isize::MAX as usize + 1 + r.below(1 << 20)
    } else if dtype == 1 || dtype == 2 {
        (l * 2).min(n)
    } else {
        l
    }
}

fn ties(r: &mut Bytes<'_>) {
    let n = r.below(64);
    let dtype = r.enum_value(3);
    let words = n; // n u32 words hold n elements of any dtype
    let m = if r.u8() % 16 == 0 { 60 + r.below(10) } else { 1 + r.below(4) };
    let mut store: Vec<Buf<u32>> = Vec::new();
    let mut models = Vec::new();
    for _ in 0..m {
        let mut b = Buf::new(words, 0u32);
        for w in b.v.iter_mut().take(words) {
            *w = r.f32().to_bits();
        }
        let (p, l) = b.arg(r);
        let len = elems(r, l, dtype, n);
        models.push(medley_merge_model {
            data: p.cast_const().cast(),
            data_len: len,
            weight: r.param(),
            density: match r.u8() % 4 {
                0 => f64::from_bits(r.u32() as u64 | ((r.u32() as u64) << 32)),
                _ => (r.below(101) as f64) / 100.0,
            },
        });
        store.push(b);
    }
    let mut base = Buf::new(words, 0u32);
    let (bp, bl) = base.arg(r);
    let bl = elems(r, bl, dtype, n);
    let mut opts = medley_ties_options {
        struct_size: size_field(r, size_of::<medley_ties_options>(), MEDLEY_TIES_OPTIONS_SIZE_V1),
        consensus: r.enum_value(2),
        votes: r.enum_value(2),
        divisor: r.enum_value(2),
        normalize: r.u32(),
        lambda: r.param(),
        row_len: if r.u8() % 4 == 0 { r.size() } else { 0 },
    };
    if r.u8() % 4 != 0 {
        opts = init(medley_ties_options_init);
    }
    let out_dtype = r.enum_value(3);
    let mut out = Buf::new(n, 0x5A5A_5A5Au32);
    let (op, ol) = out.arg(r);
    let ol = elems(r, ol, out_dtype, n);
    let (mp, mn) = match r.u8() % 8 {
        0 => (null(), r.size()),
        1 => (models.as_ptr(), usize::MAX / 16 + r.below(100)),
        _ => (models.as_ptr(), r.below(m + 1)),
    };
    let mut need = 0usize;
    let s = unsafe { medley_merge_ties_scratch_len(mp, mn, bl, &opts, &mut need) };
    known(s);
    let mut scratch = Buf::new(need.min(1 << 16), 0u32);
    let (sp, sl) = scratch.arg(r);
    let s = unsafe {
        medley_merge_ties(mp, mn, bp.cast_const().cast(), bl, dtype, &opts, op.cast(), ol, out_dtype, sp, sl)
    };
    known(s);
    if s != medley_status::Ok {
        assert!(out.untouched(), "{s:?} wrote");
    }
    assert!(out.guard_intact() && scratch.guard_intact());
    drop(store);
}

fn cuda(r: &mut Bytes<'_>) {
    // No engine can exist without a device: every call must fail on its
    // arguments or the driver, and write nothing.
    let mut engine = 0x40usize as *mut medley_cuda_engine;
    let s = match r.u8() % 6 {
        0 => medley_cuda_probe(),
        1 => unsafe {
            let p = if r.u8() % 2 == 0 { null_mut() } else { &mut engine as *mut _ };
            medley_cuda_engine_new(null_mut(), p)
        },
        2 => unsafe { medley_cuda_engine_destroy(null_mut()) },
        3 => unsafe {
            let mut bytes = 5usize;
            let s = medley_cuda_ensemble_workspace_bytes(null(), r.size(), r.size(), r.size(), r.u32(), &mut bytes);
            assert_eq!(bytes, 5);
            s
        },
        4 => unsafe {
            let mut store = Vec::new();
            let h = rows(r, &mut store);
            // Device addresses are never dereferenced on the host: any value.
            let x = medley_cuda_rows {
                data: if r.u8() % 2 == 0 { 0 } else { r.u32() as u64 },
                data_len: h.data_len,
                dtype: h.dtype,
                rows: h.rows,
                len: h.len,
                stride: h.stride,
            };
            let (k, n) = (r.size(), r.size());
            if r.u8() % 2 == 0 {
                medley_cuda_moe_topk_softmax(null(), null_mut(), &x, k, r.u32(), r.u32() as u64, n, 0, n)
            } else {
                medley_cuda_moe_keep_topk_softmax(null(), null_mut(), &x, k, 0, n, r.u32() as u64, n)
            }
        },
        _ => unsafe {
            let cfg = init(medley_ensemble_config_init);
            medley_cuda_ensemble_combine(
                null(),
                null_mut(),
                null(),
                r.size(),
                &cfg,
                r.size(),
                r.size(),
                null(),
                r.u32() as u64,
                r.size(),
                r.u32(),
            )
        },
    };
    known(s);
    if medley_cuda_probe() != medley_status::Ok {
        assert_eq!(engine as usize, 0x40);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Bytes(data);
    for _ in 0..1 + r.below(3) {
        match r.u8() % 13 {
            0..=3 => ensemble(&mut r),
            4 | 5 => gating(&mut r),
            6 | 7 => ties(&mut r),
            8 | 9 => ffi_moe::fuzz(&mut r),
            10..=12 => ffi_merge::run(&mut r),
            _ => cuda(&mut r),
        }
        check_message(&mut r);
        let _ = medley_last_cuda_error();
        let name = unsafe { CStr::from_ptr(medley_status_name(r.u32() as i32)) };
        assert!(name.to_bytes().starts_with(b"MEDLEY_STATUS_"));
    }
});
