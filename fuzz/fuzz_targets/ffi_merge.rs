//! The merge entry points besides TIES (`medley_merge_*` of
//! ffi/src/merge_methods.rs and the `medley_merge_stream_*` handle), driven
//! as C drives them: real, null, misaligned, short, overflowing and
//! overlapping buffers, huge shapes, arbitrary enum values and struct sizes.
//!
//! Asserts, for every call: a known status and no panic; a failed call
//! writes nothing (outputs pre-filled with a sentinel); no call writes past
//! the lengths it was given (guard tails) or into any input.

use super::{Buf, Bytes, elems, init, known};
use core::ffi::c_void;
use core::ptr::{null, null_mut};
use medley_ffi::*;

const FILL: u32 = 0x5A5A_5A5A;

/// The models of one call: buffers of random values, each offered as
/// (pointer, claimed elements).
struct Models {
    store: Vec<Buf<u32>>,
    copies: Vec<Vec<u32>>,
    args: Vec<(*const c_void, usize)>,
    weights: Vec<f32>,
}

impl Models {
    fn new(r: &mut Bytes<'_>, m: usize, n: usize, dtype: u32) -> Self {
        let mut store = Vec::new();
        let mut args = Vec::new();
        let mut weights = Vec::new();
        for _ in 0..m {
            let mut b = Buf::new(n, 0u32);
            for w in b.v.iter_mut().take(n) {
                *w = r.f32().to_bits();
            }
            let (p, l) = b.arg(r);
            args.push((p.cast_const().cast(), elems(r, l, dtype, n)));
            weights.push(r.param());
            store.push(b);
        }
        let copies = store.iter().map(|b| b.v.clone()).collect();
        Models {
            store,
            copies,
            args,
            weights,
        }
    }
    fn merge_models(&self, r: &mut Bytes<'_>) -> Vec<medley_merge_model> {
        self.args
            .iter()
            .zip(&self.weights)
            .map(|(&(data, data_len), &weight)| medley_merge_model {
                data,
                data_len,
                weight,
                density: density(r),
            })
            .collect()
    }
    fn gta_models(&self, r: &mut Bytes<'_>) -> Vec<medley_gta_model> {
        self.args
            .iter()
            .zip(&self.weights)
            .map(|(&(data, data_len), &weight)| medley_gta_model {
                data,
                data_len,
                weight,
                density: density(r),
                gamma: density(r),
                epsilon: density(r) / 4.0,
            })
            .collect()
    }
    fn tensors(&self) -> Vec<medley_merge_tensor> {
        self.args
            .iter()
            .map(|&(data, data_len)| medley_merge_tensor { data, data_len })
            .collect()
    }
    /// Inputs are never written, whatever the status.
    fn intact(&self) {
        for (b, c) in self.store.iter().zip(&self.copies) {
            assert!(b.v == *c, "an input was written");
        }
    }
}

fn density(r: &mut Bytes<'_>) -> f64 {
    match r.u8() % 8 {
        0 => f64::from_bits(r.u32() as u64 | ((r.u32() as u64) << 32)),
        1 => 1.0,
        _ => (r.below(101) as f64) / 100.0,
    }
}

/// A list pointer and count: real, null with any count, or overlong.
fn list<T>(r: &mut Bytes<'_>, v: &[T]) -> (*const T, usize) {
    match r.u8() % 10 {
        0 => (null(), r.size()),
        1 => (v.as_ptr(), usize::MAX / 8 + r.below(100)),
        2 => (v.as_ptr(), r.below(v.len() + 1)),
        _ => (v.as_ptr(), v.len()),
    }
}

/// A versioned struct: the library's defaults, a random body, or a bad
/// size.
fn opts<T: Copy>(r: &mut Bytes<'_>, f: unsafe extern "C" fn(*mut T, usize) -> medley_status) -> T {
    let mut v = init(f);
    if r.u8() % 4 == 0 {
        // SAFETY: T is a repr(C) struct of integers and floats (any bits);
        // the bytes after struct_size are overwritten with random values.
        let b = unsafe { core::slice::from_raw_parts_mut((&raw mut v).cast::<u8>(), size_of::<T>()) };
        for x in b.iter_mut().skip(8) {
            *x = if r.u8() % 2 == 0 { r.u8() } else { 0 };
        }
    }
    if r.u8() % 8 == 0 {
        // A size within the struct (the library reads struct_size bytes):
        // older, unknown or too small layouts.
        let size = r.below(size_of::<T>() + 1);
        // SAFETY: struct_size is the first usize field.
        unsafe { (&raw mut v).cast::<usize>().write(size) };
    }
    v
}

/// The output of one call: a sentinel-filled buffer, sometimes replaced by
/// an input (an overlap the library must refuse).
struct Out {
    b: Buf<u32>,
    p: *mut c_void,
    len: usize,
}

impl Out {
    fn new(r: &mut Bytes<'_>, n: usize, dtype: u32, ms: &Models) -> Self {
        let mut b = Buf::new(n, FILL);
        let (p, l) = b.arg(r);
        let len = elems(r, l, dtype, n);
        let mut o = Out { b, p: p.cast(), len };
        if r.u8() % 8 == 0 {
            if let Some(&(p, l)) = ms.args.first() {
                if !p.is_null() {
                    o.p = p.cast_mut();
                    o.len = l;
                }
            }
        }
        o
    }
    fn check(&self, s: medley_status) {
        known(s);
        if s != medley_status::Ok {
            assert!(self.b.untouched(), "{s:?} wrote its output");
        }
        assert!(self.b.guard_intact(), "wrote past the output");
    }
}

pub(crate) fn run(r: &mut Bytes<'_>) {
    let n = if r.u8() % 16 == 0 { r.size() } else { r.below(48) };
    let words = n.min(64);
    let dtype = r.enum_value(3);
    let out_dtype = r.enum_value(3);
    let m = match r.u8() % 16 {
        0 => 60 + r.below(10),
        1 => 0,
        _ => 1 + r.below(4),
    };
    let ms = Models::new(r, m, words, dtype);
    let mut base = Buf::new(words, 0u32);
    for w in base.v.iter_mut().take(words) {
        *w = r.f32().to_bits();
    }
    let base_copy = base.v.clone();
    let (bp, bl) = base.arg(r);
    let (bp, bl) = if r.u8() % 8 == 0 {
        (null_mut(), 0)
    } else {
        (bp, elems(r, bl, dtype, words))
    };
    let bp = bp.cast_const().cast::<c_void>();
    let out = Out::new(r, words, out_dtype, &ms);
    match r.u8() % 12 {
        0 => {
            let v = ms.merge_models(r);
            let (mp, mn) = list(r, &v);
            // SAFETY: every buffer is valid for its claimed length or the
            // invalid argument under test.
            let s = unsafe { medley_merge_linear(mp, mn, dtype, r.u32(), out.p, out.len, out_dtype) };
            out.check(s);
        }
        1 => {
            let v = ms.gta_models(r);
            let (mp, mn) = list(r, &v);
            let mut o = opts(r, medley_gta_options_init);
            if r.u8() % 2 == 0 {
                // SAFETY: o is writable for its size.
                known(unsafe {
                    medley_gta_options_init_preset(&mut o, size_of::<medley_gta_options>(), r.enum_value(9))
                });
                o.row_len = if r.u8() % 4 == 0 { r.below(8) } else { 0 };
                o.seed = r.u32() as u64;
            }
            let mut need = 0usize;
            // SAFETY: as above.
            known(unsafe { medley_merge_gta_scratch_len(mp, mn, bl, &o, &mut need) });
            let mut scratch = Buf::new(need.min(1 << 16), 0u32);
            let (sp, sl) = scratch.arg(r);
            // SAFETY: as above.
            let s = unsafe { medley_merge_gta(mp, mn, bp, bl, dtype, &o, out.p, out.len, out_dtype, sp, sl) };
            out.check(s);
            assert!(scratch.guard_intact());
        }
        2 => {
            let o = opts(r, medley_slerp_options_init);
            let (a, al) = ms.args.first().copied().unwrap_or((null(), 0));
            let (b, bl2) = ms.args.get(1).copied().unwrap_or((bp, bl));
            // SAFETY: as above.
            let s = unsafe { medley_merge_slerp(a, al, b, bl2, dtype, &o, out.p, out.len, out_dtype) };
            out.check(s);
        }
        3 => {
            let v = ms.merge_models(r);
            let (mp, mn) = list(r, &v);
            let mut o = opts(r, medley_nuslerp_options_init);
            if r.u8() % 2 == 0 {
                o.layout = r.enum_value(3);
                o.layout_len = if r.u8() % 4 == 0 { r.size() } else { r.below(8) };
            }
            let mut need = 0usize;
            // SAFETY: as above.
            known(unsafe { medley_merge_nuslerp_scratch_len(bl, &o, &mut need) });
            let mut scratch = Buf::new(need.min(1 << 14), 0f64);
            let (sp, sl) = scratch.arg(r);
            // SAFETY: as above.
            let s =
                unsafe { medley_merge_nuslerp(mp, mn, bp, bl, dtype, &o, out.p, out.len, out_dtype, sp, sl) };
            out.check(s);
            assert!(scratch.guard_intact());
        }
        4 => {
            let v = ms.merge_models(r);
            let (mp, mn) = list(r, &v);
            let o = opts(r, medley_multislerp_options_init);
            // SAFETY: as above.
            let s = unsafe { medley_merge_multislerp(mp, mn, bp, bl, dtype, &o, out.p, out.len, out_dtype) };
            out.check(s);
        }
        5 => {
            let v = ms.merge_models(r);
            let (mp, mn) = list(r, &v);
            let o = opts(r, medley_karcher_options_init);
            // SAFETY: as above.
            let s = unsafe { medley_merge_karcher(mp, mn, dtype, &o, out.p, out.len, out_dtype) };
            out.check(s);
        }
        6 => {
            let v = ms.tensors();
            let (mp, mn) = list(r, &v);
            let mut o = opts(r, medley_stock_options_init);
            if r.u8() % 2 == 0 {
                o.row_len = r.below(8);
            }
            // SAFETY: as above.
            let s = unsafe { medley_merge_model_stock(mp, mn, bp, bl, dtype, &o, out.p, out.len, out_dtype) };
            out.check(s);
        }
        7 => {
            let v = ms.tensors();
            let (mp, mn) = list(r, &v);
            let mut o = opts(r, medley_sce_options_init);
            if r.u8() % 2 == 0 {
                o.select_topk = density(r);
            }
            let mut need = 0usize;
            // SAFETY: as above.
            known(unsafe { medley_merge_sce_scratch_len(mn, bl, &o, &mut need) });
            let mut scratch = Buf::new(need.min(1 << 16), 0u32);
            let (sp, sl) = scratch.arg(r);
            // SAFETY: as above.
            let s = unsafe { medley_merge_sce(mp, mn, bp, bl, dtype, &o, out.p, out.len, out_dtype, sp, sl) };
            out.check(s);
            assert!(scratch.guard_intact());
        }
        8 => soup(r, &ms, words, dtype),
        _ => stream(r, &ms, bp, bl, n, dtype, out_dtype, &out),
    }
    ms.intact();
    assert!(base.v == base_copy, "the base was written");
}

unsafe extern "C" fn eval(p: *const f32, len: usize, user: *mut c_void) -> f32 {
    // SAFETY: the soup passes a valid buffer; user is a counter.
    unsafe {
        *user.cast::<usize>() += 1;
        core::slice::from_raw_parts(p, len)
            .iter()
            .fold(0.0f32, |a, &x| a - x.abs())
    }
}

fn soup(r: &mut Bytes<'_>, ms: &Models, n: usize, dtype: u32) {
    let v = ms.tensors();
    let (mp, mn) = list(r, &v);
    let mut sel = Buf::new(ms.args.len(), 7u8);
    let (selp, sell) = sel.arg(r);
    let mut soup = Buf::new(n, f32::from_bits(FILL));
    let (sp, sl) = soup.arg(r);
    let mut scores = Buf::new(ms.args.len(), 0.5f32);
    let (scp, scl) = scores.arg(r);
    let mut rep = init(medley_soup_report_init);
    rep.score = 99.0;
    if r.u8() % 8 == 0 {
        rep.struct_size = r.size();
    }
    let rp: *mut medley_soup_report = if r.u8() % 4 == 0 { null_mut() } else { &mut rep };
    let mut calls = 0usize;
    let user = (&raw mut calls).cast::<c_void>();
    let f: medley_soup_eval = if r.u8() % 8 == 0 { None } else { Some(eval) };
    // SAFETY: every buffer is valid for its claimed length or the invalid
    // argument under test.
    let s = unsafe {
        if r.u8() % 2 == 0 {
            medley_merge_greedy_soup(mp, mn, dtype, scp, scl, f, user, selp, sell, sp, sl, rp)
        } else {
            medley_merge_pruned_soup(mp, mn, dtype, r.below(4), f, user, selp, sell, sp, sl, rp)
        }
    };
    known(s);
    if s != medley_status::Ok {
        assert!(
            sel.untouched() && soup.untouched() && calls == 0,
            "{s:?} wrote or evaluated"
        );
        assert_eq!(rep.score, 99.0, "{s:?} wrote the report");
    }
    assert!(sel.guard_intact() && soup.guard_intact() && scores.untouched());
}

/// A random sequence of calls on one stream handle.
#[allow(clippy::too_many_arguments)]
fn stream(
    r: &mut Bytes<'_>,
    ms: &Models,
    bp: *const c_void,
    bl: usize,
    n: usize,
    dtype: u32,
    out_dtype: u32,
    out: &Out,
) {
    let mut h: *mut medley_merge_stream = 0x40usize as *mut _;
    let hp: *mut *mut medley_merge_stream = if r.u8() % 16 == 0 { null_mut() } else { &mut h };
    let w = ms.weights.clone();
    let (wp, wl) = list(r, &w);
    let k = ms.args.len();
    // SAFETY: every pointer is valid for its claimed length or the invalid
    // argument under test; huge tensors only where the scratch is small.
    let s = unsafe {
        match r.u8() % 7 {
            0 => {
                let v = ms.gta_models(r);
                let (mp, mn) = list(r, &v);
                let mut o = opts(r, medley_gta_options_init);
                // SAFETY: o is writable for its size.
                known(medley_gta_options_init_preset(
                    &mut o,
                    size_of::<medley_gta_options>(),
                    r.enum_value(9),
                ));
                o.row_len = if r.u8() % 4 == 0 { r.below(8) } else { 0 };
                let mut need = usize::MAX;
                let q = medley_merge_gta_scratch_len(mp, mn, n, &o, &mut need);
                if q == medley_status::Ok && need <= 1 << 20 && (o.sparsify != 4 || n <= 1 << 16) {
                    medley_merge_stream_new_gta(mp, mn, n, &o, hp)
                } else {
                    q
                }
            }
            1 => {
                let o = opts(r, medley_sce_options_init);
                let mut need = usize::MAX;
                let q = medley_merge_sce_scratch_len(k, n, &o, &mut need);
                if q == medley_status::Ok && need <= 1 << 20 {
                    medley_merge_stream_new_sce(k, n, &o, hp)
                } else {
                    q
                }
            }
            2 => medley_merge_stream_new_model_stock(k, n, &opts(r, medley_stock_options_init), hp),
            3 => medley_merge_stream_new_slerp(n, &opts(r, medley_slerp_options_init), hp),
            4 => {
                let o = opts(r, medley_nuslerp_options_init);
                let mut need = usize::MAX;
                let q = medley_merge_nuslerp_scratch_len(n, &o, &mut need);
                if q == medley_status::Ok && need <= 1 << 18 {
                    medley_merge_stream_new_nuslerp(wp, wl, r.u32() % 2, n, &o, hp)
                } else {
                    q
                }
            }
            5 => medley_merge_stream_new_multislerp(
                wp,
                wl,
                r.u32() % 2,
                n,
                &opts(r, medley_multislerp_options_init),
                hp,
            ),
            _ => medley_merge_stream_new_karcher(wp, wl, n, &opts(r, medley_karcher_options_init), hp),
        }
    };
    known(s);
    if s != medley_status::Ok {
        assert_eq!(h as usize, 0x40, "{s:?} wrote the handle");
        return;
    }
    let v = ms.tensors();
    for _ in 0..r.below(12) {
        let (cp, cn) = list(r, &v);
        let (b, l) = if r.u8() % 4 == 0 { (null(), 0) } else { (bp, bl) };
        // SAFETY: a live handle; buffers as above.
        let s = unsafe {
            match r.u8() % 4 {
                0 => {
                    let mut needs = 9u32;
                    let s = medley_merge_stream_needs_pass(h, &mut needs);
                    assert!(s != medley_status::Ok || needs <= 1);
                    s
                }
                1 => medley_merge_stream_feed(h, cp, cn, b, l, dtype),
                2 => medley_merge_stream_end_pass(h),
                _ => {
                    let before = out.b.v.clone();
                    let s = medley_merge_stream_apply(
                        h,
                        cp,
                        cn,
                        b,
                        l,
                        dtype,
                        r.size(),
                        out.p,
                        out.len,
                        out_dtype,
                    );
                    if s != medley_status::Ok {
                        assert!(out.b.v == before, "{s:?} wrote its output");
                    }
                    s
                }
            }
        };
        known(s);
        assert!(out.b.guard_intact());
    }
    // SAFETY: a live handle, destroyed once.
    assert_eq!(unsafe { medley_merge_stream_destroy(h) }, medley_status::Ok);
}
