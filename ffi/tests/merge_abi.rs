//! The merge entry points (every method besides TIES, and the streamed
//! merges) called from Rust exactly as C calls them: outputs equal the
//! core's functions bit for bit, streamed merges equal the one-shot calls,
//! and failures return their status and leave every output untouched.

use core::ffi::c_void;
use core::ptr::{null, null_mut};
use medley_core::merge::gta::{GtaOptions, TaskParams, merge as gta_merge};
use medley_core::merge::linear::linear;
use medley_core::merge::sce::{SceOptions, sce};
use medley_core::merge::soup::{greedy_soup, pruned_soup};
use medley_core::merge::sphere::{
    KarcherOptions, Layout, MultislerpOptions, NuslerpOptions, SlerpOptions, karcher, multislerp, nuslerp,
    slerp,
};
use medley_core::merge::stock::{StockOptions, model_stock};
use medley_core::{bf16, f16};
use medley_ffi::*;

/// A versioned struct filled by its `_init` function at this header's size.
fn init<T>(f: unsafe extern "C" fn(*mut T, usize) -> medley_status) -> T {
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: v is writable for size_of::<T>() bytes.
    assert_eq!(unsafe { f(v.as_mut_ptr(), size_of::<T>()) }, medley_status::Ok);
    // SAFETY: the init function wrote every byte of T (zeroed before).
    unsafe { v.assume_init() }
}

const SENTINEL: f32 = -12345.0;
const F32: u32 = medley_dtype::F32 as u32;
const BF16: u32 = medley_dtype::Bf16 as u32;

/// Deterministic data in about [-1, 1].
fn data(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Set {
    base: Vec<f32>,
    models: Vec<Vec<f32>>,
}

impl Set {
    fn new(m: usize, n: usize) -> Self {
        let base = data(1, n);
        let models = (0..m)
            .map(|i| {
                base.iter()
                    .zip(data(10 + i as u64, n))
                    .map(|(b, d)| b + 0.1 * d)
                    .collect()
            })
            .collect();
        Set { base, models }
    }
    fn views(&self) -> Vec<&[f32]> {
        self.models.iter().map(|v| &v[..]).collect()
    }
    fn tensors(&self) -> Vec<medley_merge_tensor> {
        self.models
            .iter()
            .map(|v| medley_merge_tensor {
                data: v.as_ptr().cast(),
                data_len: v.len(),
            })
            .collect()
    }
    fn chunk(&self, lo: usize, hi: usize) -> Vec<medley_merge_tensor> {
        self.models
            .iter()
            .map(|v| medley_merge_tensor {
                data: v[lo..hi].as_ptr().cast(),
                data_len: hi - lo,
            })
            .collect()
    }
    fn with_weights(&self, w: &[f32]) -> Vec<medley_merge_model> {
        self.models
            .iter()
            .zip(w)
            .map(|(v, &weight)| medley_merge_model {
                data: v.as_ptr().cast(),
                data_len: v.len(),
                weight,
                density: 1.0,
            })
            .collect()
    }
    fn gta(&self, p: &[TaskParams]) -> Vec<medley_gta_model> {
        self.models
            .iter()
            .zip(p)
            .map(|(v, p)| medley_gta_model {
                data: v.as_ptr().cast(),
                data_len: v.len(),
                weight: p.weight,
                density: p.density,
                gamma: p.gamma,
                epsilon: p.epsilon,
            })
            .collect()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Streams a merge in chunks of `chunk` elements: every pass fed in order,
/// then the chunks applied in reverse order. Returns the output.
fn stream(s: *mut medley_merge_stream, set: &Set, with_base: bool, chunk: usize) -> Vec<f32> {
    let n = set.base.len();
    let mut needs = 7u32;
    let mut passes = 0;
    loop {
        // SAFETY: a live handle; needs is writable.
        assert_eq!(
            // SAFETY: valid structs, buffers and out-pointers.
            unsafe { medley_merge_stream_needs_pass(s, &mut needs) },
            medley_status::Ok
        );
        if needs == 0 {
            break;
        }
        passes += 1;
        assert!(passes < 10);
        for lo in (0..n).step_by(chunk) {
            let hi = (lo + chunk).min(n);
            let c = set.chunk(lo, hi);
            let (bp, bl) = if with_base {
                (set.base[lo..hi].as_ptr().cast(), hi - lo)
            } else {
                (null(), 0)
            };
            // SAFETY: every buffer is valid for its length.
            let st = unsafe { medley_merge_stream_feed(s, c.as_ptr(), c.len(), bp, bl, F32) };
            assert_eq!(st, medley_status::Ok);
        }
        // SAFETY: a live handle.
        assert_eq!(unsafe { medley_merge_stream_end_pass(s) }, medley_status::Ok);
    }
    let mut out = vec![SENTINEL; n];
    let starts: Vec<usize> = (0..n).step_by(chunk).collect();
    for &lo in starts.iter().rev() {
        let hi = (lo + chunk).min(n);
        let c = set.chunk(lo, hi);
        let (bp, bl) = if with_base {
            (set.base[lo..hi].as_ptr().cast(), hi - lo)
        } else {
            (null(), 0)
        };
        // SAFETY: every buffer is valid for its length.
        let st = unsafe {
            medley_merge_stream_apply(
                s,
                c.as_ptr(),
                c.len(),
                bp,
                bl,
                F32,
                lo,
                out[lo..hi].as_mut_ptr().cast(),
                hi - lo,
                F32,
            )
        };
        assert_eq!(st, medley_status::Ok);
    }
    // SAFETY: a live handle, destroyed once.
    assert_eq!(unsafe { medley_merge_stream_destroy(s) }, medley_status::Ok);
    out
}

#[test]
fn linear_matches_the_core_and_fails_cleanly() {
    let set = Set::new(3, 100);
    let w = [0.5f32, 1.5, -0.25];
    let models = set.with_weights(&w);
    for normalize in [0u32, 1] {
        let mut out = vec![bf16::ZERO; 100];
        // SAFETY: every buffer is valid for its length.
        let s = unsafe {
            medley_merge_linear(
                models.as_ptr(),
                3,
                F32,
                normalize,
                out.as_mut_ptr().cast(),
                100,
                BF16,
            )
        };
        assert_eq!(s, medley_status::Ok);
        let mut want = vec![bf16::ZERO; 100];
        linear(&set.views(), &w, normalize != 0, &mut want).unwrap();
        assert_eq!(out, want);
    }
    // Chunked calls are the streaming form: the same bits.
    let mut whole = vec![0.0f32; 100];
    // SAFETY: as above.
    let s = unsafe { medley_merge_linear(models.as_ptr(), 3, F32, 1, whole.as_mut_ptr().cast(), 100, F32) };
    assert_eq!(s, medley_status::Ok);
    let mut parts = vec![0.0f32; 100];
    for lo in (0..100).step_by(30) {
        let hi = (lo + 30).min(100);
        let c: Vec<medley_merge_model> = models
            .iter()
            .map(|m| medley_merge_model {
                // SAFETY: inside the model's buffer.
                data: unsafe { m.data.cast::<f32>().add(lo) }.cast(),
                data_len: hi - lo,
                ..*m
            })
            .collect();
        // SAFETY: as above.
        let s = unsafe {
            medley_merge_linear(
                c.as_ptr(),
                3,
                F32,
                1,
                parts[lo..hi].as_mut_ptr().cast(),
                hi - lo,
                F32,
            )
        };
        assert_eq!(s, medley_status::Ok);
    }
    assert_eq!(bits(&whole), bits(&parts));
    // Failures.
    let mut out = vec![SENTINEL; 100];
    let op = out.as_mut_ptr().cast::<c_void>();
    let mis = out.as_mut_ptr().cast::<u8>().wrapping_add(1).cast::<c_void>();
    let zero_sum = set.with_weights(&[1.0, -1.0, 0.0]);
    let mut shared = set.with_weights(&w);
    shared[1].data = op.cast_const();
    let cases: [(medley_status, unsafe extern "C" fn() -> medley_status); 0] = [];
    let _ = cases;
    // SAFETY: each call gets valid buffers or the invalid argument tested.
    let got = unsafe {
        [
            medley_merge_linear(null(), 3, F32, 1, op, 100, F32),
            medley_merge_linear(models.as_ptr(), 0, F32, 1, op, 100, F32),
            medley_merge_linear(models.as_ptr(), 3, F32, 1, null_mut(), 100, F32),
            medley_merge_linear(models.as_ptr(), 3, F32, 1, mis, 99, F32),
            medley_merge_linear(models.as_ptr(), 3, F32, 1, op, 99, F32),
            medley_merge_linear(models.as_ptr(), 3, 3, 1, op, 100, F32),
            medley_merge_linear(models.as_ptr(), 3, F32, 1, op, 100, 77),
            medley_merge_linear(models.as_ptr(), 3, F32, 1, op, usize::MAX / 2, F32),
            medley_merge_linear(zero_sum.as_ptr(), 3, F32, 1, op, 100, F32),
            medley_merge_linear(shared.as_ptr(), 3, F32, 1, op, 100, F32),
            medley_merge_linear(models.as_ptr(), 65, F32, 1, op, 100, F32),
        ]
    };
    use medley_status::*;
    assert_eq!(
        got,
        [
            NullArgument,
            BadShape,
            NullArgument,
            Misaligned,
            BadShape,
            BadParameter,
            BadParameter,
            Overflow,
            BadParameter,
            Overlap,
            BadShape
        ]
    );
    assert!(out.iter().all(|&x| x == SENTINEL));
}

fn presets() -> Vec<(u32, GtaOptions)> {
    vec![
        (
            medley_gta_preset::TaskArithmetic as u32,
            GtaOptions::task_arithmetic(),
        ),
        (medley_gta_preset::Ties as u32, GtaOptions::ties()),
        (medley_gta_preset::TiesPaper as u32, GtaOptions::ties_paper()),
        (medley_gta_preset::DareTies as u32, GtaOptions::dare_ties(0, 0)),
        (
            medley_gta_preset::DareLinear as u32,
            GtaOptions::dare_linear(0, 0),
        ),
        (medley_gta_preset::Breadcrumbs as u32, GtaOptions::breadcrumbs()),
        (
            medley_gta_preset::BreadcrumbsTies as u32,
            GtaOptions::breadcrumbs_ties(),
        ),
        (medley_gta_preset::Della as u32, GtaOptions::della(None, 0, 0)),
        (
            medley_gta_preset::DellaLinear as u32,
            GtaOptions::della_linear(None, 0, 0),
        ),
    ]
}

fn preset(p: u32) -> medley_gta_options {
    let mut o = std::mem::MaybeUninit::<medley_gta_options>::zeroed();
    // SAFETY: writable for its size.
    assert_eq!(
        // SAFETY: valid structs, buffers and out-pointers.
        unsafe { medley_gta_options_init_preset(o.as_mut_ptr(), size_of::<medley_gta_options>(), p) },
        medley_status::Ok
    );
    // SAFETY: initialized by the call.
    unsafe { o.assume_init() }
}

#[test]
fn gta_family_matches_the_core_and_streams_bit_exactly() {
    let n = 256;
    let set = Set::new(3, n);
    let params = [
        TaskParams::new(1.0)
            .with_density(0.5)
            .with_gamma(0.05)
            .with_epsilon(0.1),
        TaskParams::new(0.7)
            .with_density(0.3)
            .with_gamma(0.02)
            .with_epsilon(0.2),
        TaskParams::new(-0.4)
            .with_density(0.9)
            .with_gamma(0.0)
            .with_epsilon(0.05),
    ];
    let models = set.gta(&params);
    for (p, core_opts) in presets() {
        for row_len in [0usize, 64] {
            let mut o = preset(p);
            o.seed = 42;
            o.tensor_id = 7;
            o.row_len = row_len;
            o.lambda = 0.9;
            let mut g = core_opts;
            g.seed = 42;
            g.tensor_id = 7;
            g.row_len = (row_len != 0).then_some(row_len);
            g.lambda = 0.9;
            let mut len = usize::MAX;
            // SAFETY: valid structs and out-pointer.
            let s = unsafe { medley_merge_gta_scratch_len(models.as_ptr(), 3, n, &o, &mut len) };
            assert_eq!(s, medley_status::Ok);
            let mut scratch = vec![0u32; len];
            let mut out = vec![SENTINEL; n];
            // SAFETY: every buffer is valid for its length.
            let s = unsafe {
                medley_merge_gta(
                    models.as_ptr(),
                    3,
                    set.base.as_ptr().cast(),
                    n,
                    F32,
                    &o,
                    out.as_mut_ptr().cast(),
                    n,
                    F32,
                    scratch.as_mut_ptr(),
                    len,
                )
            };
            assert_eq!(s, medley_status::Ok, "preset {p} row_len {row_len}");
            let mut want = vec![0.0f32; n];
            let mut sc = vec![0u32; len];
            gta_merge(&set.views(), &set.base, &params, &g, &mut sc, &mut want).unwrap();
            assert_eq!(bits(&out), bits(&want), "preset {p} row_len {row_len}");
            let mut h = null_mut();
            // SAFETY: valid structs and out-pointer.
            let s = unsafe { medley_merge_stream_new_gta(models.as_ptr(), 3, n, &o, &mut h) };
            assert_eq!(s, medley_status::Ok);
            // DELLA over one row takes the tensor as a single chunk.
            let whole_row = g.sparsify == medley_core::merge::gta::Sparsify::Della && row_len == 0;
            let chunk = if whole_row { n } else { 64 };
            assert_eq!(
                bits(&stream(h, &set, true, chunk)),
                bits(&want),
                "stream preset {p}"
            );
        }
    }
    // Failures leave the output untouched.
    let o = preset(medley_gta_preset::Ties as u32);
    let mut out = vec![SENTINEL; n];
    let op = out.as_mut_ptr().cast::<c_void>();
    let bp = set.base.as_ptr().cast::<c_void>();
    let mut short_scratch = vec![0u32; 1];
    let mut bad = o;
    bad.rescale = 99;
    let mut inv = o;
    inv.rescale = medley_gta_rescale::InverseKeep as u32;
    let mut size = o;
    size.struct_size = 12;
    let mut dens = set.gta(&params);
    dens[0].density = 1.5;
    use medley_status::*;
    // SAFETY: each call gets valid buffers or the invalid argument tested.
    let got = unsafe {
        [
            medley_merge_gta(models.as_ptr(), 3, bp, n, F32, null(), op, n, F32, null_mut(), 0),
            medley_merge_gta(models.as_ptr(), 3, bp, n, F32, &bad, op, n, F32, null_mut(), 0),
            medley_merge_gta(models.as_ptr(), 3, bp, n, F32, &size, op, n, F32, null_mut(), 0),
            medley_merge_gta(models.as_ptr(), 3, bp, n, F32, &inv, op, n, F32, null_mut(), 0),
            medley_merge_gta(dens.as_ptr(), 3, bp, n, F32, &o, op, n, F32, null_mut(), 0),
            medley_merge_gta(
                models.as_ptr(),
                3,
                bp,
                n,
                F32,
                &o,
                op,
                n,
                F32,
                short_scratch.as_mut_ptr(),
                1,
            ),
            medley_merge_gta(models.as_ptr(), 3, bp, n - 1, F32, &o, op, n, F32, null_mut(), 0),
            medley_merge_gta(
                models.as_ptr(),
                3,
                op.cast_const(),
                n,
                F32,
                &o,
                op,
                n,
                F32,
                null_mut(),
                0,
            ),
            medley_merge_gta(models.as_ptr(), 3, bp, n, F32, &o, op, n, F32, op.cast(), 4),
        ]
    };
    assert_eq!(
        got,
        [
            NullArgument,
            BadParameter,
            StructSize,
            Unsupported,
            BadParameter,
            BadShape,
            BadShape,
            Overlap,
            Overlap
        ]
    );
    assert!(out.iter().all(|&x| x == SENTINEL));
    // An unknown preset writes nothing.
    let mut o2 = o;
    // SAFETY: writable for its size.
    let s = unsafe { medley_gta_options_init_preset(&mut o2, size_of::<medley_gta_options>(), 9) };
    assert_eq!(s, BadParameter);
    assert_eq!(o2.lambda, o.lambda);
}

#[test]
fn spherical_merges_match_the_core_and_stream() {
    let n = 96;
    let set = Set::new(3, n);
    // SLERP.
    let mut so = init(medley_slerp_options_init);
    assert_eq!(so.dot_threshold, 0.9995);
    so.t = 0.3;
    let mut out = vec![SENTINEL; n];
    let (a, b) = (&set.models[0], &set.models[1]);
    // SAFETY: every buffer is valid for its length.
    let s = unsafe {
        medley_merge_slerp(
            a.as_ptr().cast(),
            n,
            b.as_ptr().cast(),
            n,
            F32,
            &so,
            out.as_mut_ptr().cast(),
            n,
            F32,
        )
    };
    assert_eq!(s, medley_status::Ok);
    let mut want = vec![0.0f32; n];
    slerp(
        a,
        b,
        &SlerpOptions {
            t: 0.3,
            ..SlerpOptions::new(0.3)
        },
        &mut want,
    )
    .unwrap();
    assert_eq!(bits(&out), bits(&want));
    let two = Set {
        base: set.base.clone(),
        models: set.models[..2].to_vec(),
    };
    let mut h = null_mut();
    // SAFETY: valid struct and out-pointer.
    assert_eq!(
        // SAFETY: valid structs, buffers and out-pointers.
        unsafe { medley_merge_stream_new_slerp(n, &so, &mut h) },
        medley_status::Ok
    );
    assert_eq!(bits(&stream(h, &two, false, 25)), bits(&want));

    // NuSLERP, every layout, with and without a base.
    let w = [0.3f32, 0.9];
    let models = two.with_weights(&w);
    for (layout, len) in [(0u32, 0usize), (1, 16), (2, 16)] {
        for with_base in [false, true] {
            let mut no = init(medley_nuslerp_options_init);
            no.layout = layout;
            no.layout_len = len;
            let mut sl = 99;
            // SAFETY: valid struct and out-pointer.
            assert_eq!(
                // SAFETY: valid structs, buffers and out-pointers.
                unsafe { medley_merge_nuslerp_scratch_len(n, &no, &mut sl) },
                medley_status::Ok
            );
            let mut scratch = vec![0.0f64; sl];
            let (bp, bl) = if with_base {
                (set.base.as_ptr().cast(), n)
            } else {
                (null(), 0)
            };
            let mut out = vec![SENTINEL; n];
            // SAFETY: every buffer is valid for its length.
            let s = unsafe {
                medley_merge_nuslerp(
                    models.as_ptr(),
                    2,
                    bp,
                    bl,
                    F32,
                    &no,
                    out.as_mut_ptr().cast(),
                    n,
                    F32,
                    scratch.as_mut_ptr(),
                    sl,
                )
            };
            assert_eq!(s, medley_status::Ok);
            let lay = match layout {
                0 => Layout::Flat,
                1 => Layout::Rows(len),
                _ => Layout::Columns(len),
            };
            let opts = NuslerpOptions {
                layout: lay,
                ..NuslerpOptions::new()
            };
            let mut want = vec![0.0f32; n];
            let mut sc = vec![0.0f64; sl];
            let base = with_base.then_some(&set.base[..]);
            nuslerp(&two.models[0], &two.models[1], base, w, &opts, &mut sc, &mut want).unwrap();
            assert_eq!(bits(&out), bits(&want), "layout {layout} base {with_base}");
            let mut h = null_mut();
            // SAFETY: valid structs and out-pointer.
            let s =
                unsafe { medley_merge_stream_new_nuslerp(w.as_ptr(), 2, with_base as u32, n, &no, &mut h) };
            assert_eq!(s, medley_status::Ok);
            assert_eq!(
                bits(&stream(h, &two, with_base, 32)),
                bits(&want),
                "stream layout {layout}"
            );
        }
    }

    // Multi-SLERP and Karcher.
    let w3 = [0.2f32, 0.5, 0.3];
    let models = set.with_weights(&w3);
    for with_base in [false, true] {
        let mo = init(medley_multislerp_options_init);
        let (bp, bl) = if with_base {
            (set.base.as_ptr().cast(), n)
        } else {
            (null(), 0)
        };
        let mut out = vec![SENTINEL; n];
        // SAFETY: every buffer is valid for its length.
        let s = unsafe {
            medley_merge_multislerp(
                models.as_ptr(),
                3,
                bp,
                bl,
                F32,
                &mo,
                out.as_mut_ptr().cast(),
                n,
                F32,
            )
        };
        assert_eq!(s, medley_status::Ok);
        let mut want = vec![0.0f32; n];
        multislerp(
            &set.views(),
            with_base.then_some(&set.base[..]),
            &w3,
            &MultislerpOptions::new(),
            &mut want,
        )
        .unwrap();
        assert_eq!(bits(&out), bits(&want));
        let mut h = null_mut();
        // SAFETY: valid structs and out-pointer.
        let s =
            unsafe { medley_merge_stream_new_multislerp(w3.as_ptr(), 3, with_base as u32, n, &mo, &mut h) };
        assert_eq!(s, medley_status::Ok);
        assert_eq!(bits(&stream(h, &set, with_base, 40)), bits(&want));
    }
    let ko = init(medley_karcher_options_init);
    let mut out = vec![SENTINEL; n];
    // SAFETY: every buffer is valid for its length.
    let s = unsafe { medley_merge_karcher(models.as_ptr(), 3, F32, &ko, out.as_mut_ptr().cast(), n, F32) };
    assert_eq!(s, medley_status::Ok);
    let mut want = vec![0.0f32; n];
    karcher(&set.views(), &w3, &KarcherOptions::new(), &mut want).unwrap();
    assert_eq!(bits(&out), bits(&want));
    let mut h = null_mut();
    // SAFETY: valid structs and out-pointer.
    assert_eq!(
        // SAFETY: valid structs, buffers and out-pointers.
        unsafe { medley_merge_stream_new_karcher(w3.as_ptr(), 3, n, &ko, &mut h) },
        medley_status::Ok
    );
    assert_eq!(bits(&stream(h, &set, false, 50)), bits(&want));

    // Failures leave the output untouched.
    let mut out = vec![SENTINEL; n];
    let op = out.as_mut_ptr().cast::<c_void>();
    let mut bad_t = so;
    bad_t.t = f32::NAN;
    let mut bad_layout = init(medley_nuslerp_options_init);
    bad_layout.layout = 5;
    let mo = init(medley_multislerp_options_init);
    let mut bad_ko = ko;
    bad_ko.tol = -1.0;
    let neg = set.with_weights(&[1.0, -1.0, 1.0]);
    use medley_status::*;
    // SAFETY: each call gets valid buffers or the invalid argument tested.
    let got = unsafe {
        [
            medley_merge_slerp(
                a.as_ptr().cast(),
                n,
                b.as_ptr().cast(),
                n,
                F32,
                &bad_t,
                op,
                n,
                F32,
            ),
            medley_merge_slerp(
                a.as_ptr().cast(),
                n,
                b.as_ptr().cast(),
                n - 1,
                F32,
                &so,
                op,
                n,
                F32,
            ),
            medley_merge_slerp(a.as_ptr().cast(), n, op.cast_const(), n, F32, &so, op, n, F32),
            medley_merge_nuslerp(
                models.as_ptr(),
                2,
                null(),
                0,
                F32,
                &bad_layout,
                op,
                n,
                F32,
                null_mut(),
                0,
            ),
            medley_merge_nuslerp(
                models.as_ptr(),
                3,
                null(),
                0,
                F32,
                &init(medley_nuslerp_options_init),
                op,
                n,
                F32,
                null_mut(),
                0,
            ),
            medley_merge_multislerp(models.as_ptr(), 3, null(), 5, F32, &mo, op, n, F32),
            medley_merge_multislerp(models.as_ptr(), 3, null(), 0, F32, &mo, op, n, 3),
            medley_merge_karcher(models.as_ptr(), 3, F32, &bad_ko, op, n, F32),
            medley_merge_karcher(neg.as_ptr(), 3, F32, &ko, op, n, F32),
        ]
    };
    assert_eq!(
        got,
        [
            BadParameter,
            BadShape,
            Overlap,
            BadParameter,
            BadShape,
            NullArgument,
            BadParameter,
            BadParameter,
            BadParameter
        ]
    );
    assert!(out.iter().all(|&x| x == SENTINEL));
    // Columns whose scratch (3 per column) overflows are refused (found by
    // the fuzzer: the query used to overflow).
    let mut cols = init(medley_nuslerp_options_init);
    cols.layout = medley_nuslerp_layout::Columns as u32;
    cols.layout_len = usize::MAX / 3 + 1;
    let mut sl = 7;
    // SAFETY: valid struct and out-pointer.
    let s = unsafe { medley_merge_nuslerp_scratch_len(cols.layout_len, &cols, &mut sl) };
    assert_eq!((s, sl), (BadShape, 7));
}

#[test]
fn stock_and_sce_match_the_core_and_stream() {
    let n = 128;
    let set = Set::new(3, n);
    let ts = set.tensors();
    for row_len in [0usize, 32] {
        let mut o = init(medley_stock_options_init);
        o.row_len = row_len;
        let mut out = vec![SENTINEL; n];
        // SAFETY: every buffer is valid for its length.
        let s = unsafe {
            medley_merge_model_stock(
                ts.as_ptr(),
                3,
                set.base.as_ptr().cast(),
                n,
                F32,
                &o,
                out.as_mut_ptr().cast(),
                n,
                F32,
            )
        };
        assert_eq!(s, medley_status::Ok);
        let mut want = vec![0.0f32; n];
        let opts = StockOptions {
            rows: (row_len != 0).then_some(row_len),
        };
        model_stock(&set.views(), &set.base, &opts, &mut want).unwrap();
        assert_eq!(bits(&out), bits(&want));
        let mut h = null_mut();
        // SAFETY: valid struct and out-pointer.
        assert_eq!(
            // SAFETY: valid structs, buffers and out-pointers.
            unsafe { medley_merge_stream_new_model_stock(3, n, &o, &mut h) },
            medley_status::Ok
        );
        assert_eq!(bits(&stream(h, &set, true, 32)), bits(&want));
    }
    for topk in [1.0f64, 0.4] {
        let mut o = init(medley_sce_options_init);
        o.select_topk = topk;
        let mut sl = 99;
        // SAFETY: valid struct and out-pointer.
        assert_eq!(
            // SAFETY: valid structs, buffers and out-pointers.
            unsafe { medley_merge_sce_scratch_len(3, n, &o, &mut sl) },
            medley_status::Ok
        );
        let mut scratch = vec![0u32; sl];
        let mut out = vec![f16::ZERO; n];
        // SAFETY: every buffer is valid for its length.
        let s = unsafe {
            medley_merge_sce(
                ts.as_ptr(),
                3,
                set.base.as_ptr().cast(),
                n,
                F32,
                &o,
                out.as_mut_ptr().cast(),
                n,
                medley_dtype::F16 as u32,
                scratch.as_mut_ptr(),
                sl,
            )
        };
        assert_eq!(s, medley_status::Ok);
        let mut want = vec![f16::ZERO; n];
        let mut sc = vec![0u32; sl];
        sce(
            &set.views(),
            &set.base,
            &SceOptions { select_topk: topk },
            &mut sc,
            &mut want,
        )
        .unwrap();
        assert_eq!(out, want);
        let mut want32 = vec![0.0f32; n];
        sce(
            &set.views(),
            &set.base,
            &SceOptions { select_topk: topk },
            &mut sc,
            &mut want32,
        )
        .unwrap();
        let mut h = null_mut();
        // SAFETY: valid struct and out-pointer.
        assert_eq!(
            // SAFETY: valid structs, buffers and out-pointers.
            unsafe { medley_merge_stream_new_sce(3, n, &o, &mut h) },
            medley_status::Ok
        );
        assert_eq!(bits(&stream(h, &set, true, 48)), bits(&want32));
    }
    let mut out = vec![SENTINEL; n];
    let op = out.as_mut_ptr().cast::<c_void>();
    let bp = set.base.as_ptr().cast::<c_void>();
    let so = init(medley_stock_options_init);
    let mut bad_rows = so;
    bad_rows.row_len = 5;
    let mut sce_o = init(medley_sce_options_init);
    sce_o.select_topk = 0.0;
    use medley_status::*;
    // SAFETY: each call gets valid buffers or the invalid argument tested.
    let got = unsafe {
        [
            medley_merge_model_stock(ts.as_ptr(), 1, bp, n, F32, &so, op, n, F32),
            medley_merge_model_stock(ts.as_ptr(), 3, bp, n, F32, &bad_rows, op, n, F32),
            medley_merge_model_stock(ts.as_ptr(), 3, bp, n, F32, &so, op, n + 1, F32),
            medley_merge_sce(ts.as_ptr(), 3, bp, n, F32, &sce_o, op, n, F32, null_mut(), 0),
            medley_merge_sce(ts.as_ptr(), 3, bp, n, F32, null(), op, n, F32, null_mut(), 0),
        ]
    };
    assert_eq!(
        got,
        [Unsupported, BadParameter, BadShape, BadParameter, NullArgument]
    );
    assert!(out.iter().all(|&x| x == SENTINEL));
}

/// Score: minus the squared distance to the all-`0.05` vector.
unsafe extern "C" fn closeness(p: *const f32, len: usize, user: *mut c_void) -> f32 {
    // SAFETY: the soup passes a valid buffer; user counts the calls.
    unsafe {
        *user.cast::<usize>() += 1;
        -core::slice::from_raw_parts(p, len)
            .iter()
            .map(|x| (x - 0.05) * (x - 0.05))
            .sum::<f32>()
    }
}

fn score(s: &[f32]) -> f32 {
    -s.iter().map(|x| (x - 0.05) * (x - 0.05)).sum::<f32>()
}

#[test]
fn soups_match_the_core_and_fail_cleanly() {
    let n = 40;
    let set = Set::new(4, n);
    let ts = set.tensors();
    for greedy in [true, false] {
        let mut sel = [9u8; 4];
        let mut soup = vec![SENTINEL; n];
        let mut rep = init(medley_soup_report_init);
        let mut calls = 0usize;
        let user = (&raw mut calls).cast::<c_void>();
        // SAFETY: every buffer is valid for its length.
        let s = unsafe {
            if greedy {
                medley_merge_greedy_soup(
                    ts.as_ptr(),
                    4,
                    F32,
                    null(),
                    0,
                    Some(closeness),
                    user,
                    sel.as_mut_ptr(),
                    4,
                    soup.as_mut_ptr(),
                    n,
                    &mut rep,
                )
            } else {
                medley_merge_pruned_soup(
                    ts.as_ptr(),
                    4,
                    F32,
                    3,
                    Some(closeness),
                    user,
                    sel.as_mut_ptr(),
                    4,
                    soup.as_mut_ptr(),
                    n,
                    &mut rep,
                )
            }
        };
        assert_eq!(s, medley_status::Ok);
        let mut want_sel = [false; 4];
        let mut want = vec![0.0f32; n];
        let r = if greedy {
            greedy_soup(&set.views(), None, score, &mut want_sel, &mut want).unwrap()
        } else {
            pruned_soup(&set.views(), 3, score, &mut want_sel, &mut want).unwrap()
        };
        assert_eq!(bits(&soup), bits(&want));
        assert_eq!(sel.map(|x| x != 0), want_sel);
        assert_eq!(
            (rep.ingredients, rep.evaluations, rep.score.to_bits()),
            (r.ingredients, r.evaluations, r.score.to_bits())
        );
        assert_eq!(calls, r.evaluations);
    }
    // Given scores.
    let scores = [0.1f32, 0.4, 0.3, 0.2];
    let mut sel = [0u8; 4];
    let mut soup = vec![0.0f32; n];
    let mut calls = 0usize;
    // SAFETY: every buffer is valid for its length; no report.
    let s = unsafe {
        medley_merge_greedy_soup(
            ts.as_ptr(),
            4,
            F32,
            scores.as_ptr(),
            4,
            Some(closeness),
            (&raw mut calls).cast(),
            sel.as_mut_ptr(),
            4,
            soup.as_mut_ptr(),
            n,
            null_mut(),
        )
    };
    assert_eq!(s, medley_status::Ok);
    let mut want_sel = [false; 4];
    let mut want = vec![0.0f32; n];
    greedy_soup(&set.views(), Some(&scores), score, &mut want_sel, &mut want).unwrap();
    assert_eq!(bits(&soup), bits(&want));
    // Failures: nothing written, the evaluator never called.
    let mut sel = [9u8; 4];
    let mut soup = vec![SENTINEL; n];
    let mut rep = init(medley_soup_report_init);
    rep.score = SENTINEL;
    let mut bad_rep = rep;
    bad_rep.struct_size = 3;
    let mut calls = 0usize;
    let user = (&raw mut calls).cast::<c_void>();
    let (sp, selp) = (soup.as_mut_ptr(), sel.as_mut_ptr());
    use medley_status::*;
    // SAFETY: each call gets valid buffers or the invalid argument tested.
    let got = unsafe {
        [
            medley_merge_greedy_soup(
                ts.as_ptr(),
                4,
                F32,
                null(),
                0,
                None,
                user,
                selp,
                4,
                sp,
                n,
                &mut rep,
            ),
            medley_merge_greedy_soup(
                ts.as_ptr(),
                4,
                F32,
                scores.as_ptr(),
                3,
                Some(closeness),
                user,
                selp,
                4,
                sp,
                n,
                &mut rep,
            ),
            medley_merge_greedy_soup(
                ts.as_ptr(),
                4,
                F32,
                null(),
                0,
                Some(closeness),
                user,
                selp,
                3,
                sp,
                n,
                &mut rep,
            ),
            medley_merge_greedy_soup(
                ts.as_ptr(),
                4,
                F32,
                null(),
                0,
                Some(closeness),
                user,
                selp,
                4,
                sp,
                n - 1,
                &mut rep,
            ),
            medley_merge_greedy_soup(
                ts.as_ptr(),
                4,
                F32,
                null(),
                0,
                Some(closeness),
                user,
                selp,
                4,
                sp,
                n,
                &mut bad_rep,
            ),
            medley_merge_greedy_soup(
                ts.as_ptr(),
                4,
                9,
                null(),
                0,
                Some(closeness),
                user,
                selp,
                4,
                sp,
                n,
                &mut rep,
            ),
            medley_merge_pruned_soup(
                ts.as_ptr(),
                4,
                F32,
                1,
                Some(closeness),
                user,
                sp.cast(),
                4,
                sp,
                n,
                &mut rep,
            ),
            medley_merge_pruned_soup(
                ts.as_ptr(),
                0,
                F32,
                1,
                Some(closeness),
                user,
                selp,
                0,
                sp,
                n,
                &mut rep,
            ),
        ]
    };
    assert_eq!(
        got,
        [
            NullArgument,
            BadShape,
            BadShape,
            BadShape,
            StructSize,
            BadParameter,
            Overlap,
            BadShape
        ]
    );
    assert_eq!(calls, 0);
    assert_eq!(sel, [9; 4]);
    assert!(soup.iter().all(|&x| x == SENTINEL));
    assert_eq!(rep.score, SENTINEL);
}

#[test]
fn stream_misuse_returns_a_status() {
    let n = 64;
    let set = Set::new(2, n);
    let params = [
        TaskParams::new(1.0).with_density(0.5),
        TaskParams::new(1.0).with_density(0.5),
    ];
    let models = set.gta(&params);
    let o = preset(medley_gta_preset::Ties as u32);
    let mut h = null_mut();
    use medley_status::*;
    // SAFETY: valid structs and out-pointer.
    assert_eq!(
        // SAFETY: valid structs, buffers and out-pointers.
        unsafe { medley_merge_stream_new_gta(models.as_ptr(), 2, n, &o, &mut h) },
        Ok
    );
    let c = set.chunk(0, 32);
    let bp = set.base.as_ptr().cast::<c_void>();
    let mut out = vec![SENTINEL; n];
    let op = out.as_mut_ptr().cast::<c_void>();
    let mut needs = 0;
    // SAFETY: a live handle and valid buffers, or the misuse tested.
    unsafe {
        assert_eq!(medley_merge_stream_needs_pass(h, &mut needs), Ok);
        assert_eq!(needs, 1);
        // Apply before the statistics.
        assert_eq!(
            medley_merge_stream_apply(h, c.as_ptr(), 2, bp, 32, F32, 0, op, 32, F32),
            Unsupported
        );
        // Wrong chunk lengths, model counts, dtypes, a missing base.
        assert_eq!(medley_merge_stream_feed(h, c.as_ptr(), 2, bp, 31, F32), BadShape);
        assert_eq!(medley_merge_stream_feed(h, c.as_ptr(), 1, bp, 32, F32), BadShape);
        assert_eq!(
            medley_merge_stream_feed(h, c.as_ptr(), 2, bp, 32, 5),
            BadParameter
        );
        assert_eq!(
            medley_merge_stream_feed(h, c.as_ptr(), 2, null(), 0, F32),
            BadShape
        );
        // An incomplete pass.
        assert_eq!(medley_merge_stream_feed(h, c.as_ptr(), 2, bp, 32, F32), Ok);
        assert_eq!(medley_merge_stream_end_pass(h), BadShape);
        // Past the end.
        let c2 = set.chunk(32, 64);
        assert_eq!(
            medley_merge_stream_feed(h, c2.as_ptr(), 2, bp.cast::<f32>().add(32).cast(), 32, F32),
            Ok
        );
        assert_eq!(
            medley_merge_stream_feed(h, c2.as_ptr(), 2, bp.cast::<f32>().add(32).cast(), 32, F32),
            BadShape
        );
        assert_eq!(medley_merge_stream_destroy(h), Ok);
        // Null handles, pointers.
        assert_eq!(medley_merge_stream_destroy(null_mut()), NullArgument);
        assert_eq!(
            medley_merge_stream_needs_pass(null_mut(), &mut needs),
            NullArgument
        );
        assert_eq!(
            medley_merge_stream_new_gta(models.as_ptr(), 2, n, &o, null_mut()),
            NullArgument
        );
        // Feed after the statistics; apply past the end or out of place.
        let so = init(medley_slerp_options_init);
        let mut h = null_mut();
        assert_eq!(medley_merge_stream_new_slerp(n, &so, &mut h), Ok);
        let all = set.chunk(0, n);
        assert_eq!(
            medley_merge_stream_feed(h, all.as_ptr(), 2, bp, n, F32),
            Unsupported
        );
        assert_eq!(medley_merge_stream_end_pass(h), BadShape);
        assert_eq!(medley_merge_stream_feed(h, all.as_ptr(), 2, null(), 0, F32), Ok);
        assert_eq!(medley_merge_stream_end_pass(h), Ok);
        assert_eq!(medley_merge_stream_end_pass(h), Unsupported);
        assert_eq!(
            medley_merge_stream_feed(h, all.as_ptr(), 2, null(), 0, F32),
            Unsupported
        );
        assert_eq!(
            medley_merge_stream_apply(h, c.as_ptr(), 2, null(), 0, F32, 40, op, 32, F32),
            BadShape
        );
        assert_eq!(
            medley_merge_stream_apply(h, c.as_ptr(), 2, null(), 0, F32, 0, op, 31, F32),
            BadShape
        );
        assert_eq!(
            medley_merge_stream_apply(h, c.as_ptr(), 2, null(), 0, F32, 0, c[0].data.cast_mut(), 32, F32),
            Overlap
        );
        assert_eq!(medley_merge_stream_destroy(h), Ok);
    }
    assert!(out.iter().all(|&x| x == SENTINEL));
}

#[test]
fn option_structs_follow_the_abi_policy() {
    use medley_status::*;
    let mut o = std::mem::MaybeUninit::<[u8; 128]>::zeroed();
    let p = o.as_mut_ptr().cast::<medley_gta_options>();
    // SAFETY: 128 writable bytes.
    unsafe {
        assert_eq!(medley_gta_options_init(p, MEDLEY_GTA_OPTIONS_SIZE_V1), Ok);
        assert_eq!(medley_gta_options_init(p, 128), Ok);
        assert_eq!(medley_gta_options_init(p, 20), StructSize);
        assert_eq!(
            medley_slerp_options_init(p.cast(), MEDLEY_SLERP_OPTIONS_SIZE_V1 - 8),
            StructSize
        );
        assert_eq!(medley_sce_options_init(null_mut(), 16), NullArgument);
        assert_eq!(
            medley_sce_options_init(p.cast::<u8>().add(1).cast(), 16),
            Misaligned
        );
    }
    assert_eq!(MEDLEY_GTA_OPTIONS_SIZE_V1, 56);
    assert_eq!(MEDLEY_SLERP_OPTIONS_SIZE_V1, 32);
    assert_eq!(MEDLEY_NUSLERP_OPTIONS_SIZE_V1, 32);
    assert_eq!(MEDLEY_MULTISLERP_OPTIONS_SIZE_V1, 24);
    assert_eq!(MEDLEY_KARCHER_OPTIONS_SIZE_V1, 24);
    assert_eq!(MEDLEY_STOCK_OPTIONS_SIZE_V1, 16);
    assert_eq!(MEDLEY_SCE_OPTIONS_SIZE_V1, 16);
    assert_eq!(MEDLEY_SOUP_REPORT_SIZE_V1, 32);
    assert_eq!(size_of::<medley_gta_model>(), 48);
    assert_eq!(size_of::<medley_merge_tensor>(), 16);
    // A newer struct with a nonzero unknown tail is refused.
    let set = Set::new(2, 8);
    let models = set.gta(&[TaskParams::new(1.0), TaskParams::new(1.0)]);
    let mut big = [0u64; 16];
    // SAFETY: 128 writable bytes, aligned for the struct.
    unsafe {
        let bp = big.as_mut_ptr().cast::<medley_gta_options>();
        assert_eq!(medley_gta_options_init(bp, 128), Ok);
        let mut len = 5;
        assert_eq!(
            medley_merge_gta_scratch_len(models.as_ptr(), 2, 8, bp, &mut len),
            Ok
        );
        assert_eq!(len, 0);
        bp.cast::<u64>().add(10).write(1);
        len = 5;
        assert_eq!(
            medley_merge_gta_scratch_len(models.as_ptr(), 2, 8, bp, &mut len),
            StructSize
        );
        assert_eq!(len, 5);
    }
}
