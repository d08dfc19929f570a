//! The MoE entry points called from Rust exactly as C calls them: the CPU
//! ones equal the core bit for bit and leave their outputs untouched on
//! every failure; the GPU ones check their arguments (with or without an
//! engine) and report the driver's code where no device is usable, and
//! where one is, run one small layer end to end on their own stream
//! against the CPU entry points.

use core::ptr::{null, null_mut};
use medley_core::moe::gating::{GroupedConfig, grouped_topk};
use medley_core::moe::layer::{Experts, Plan, Routing, layer_scratch_len, moe_layer};
use medley_core::moe::plan::{align_block_size, block_padded_len, sort_by_expert};
use medley_core::moe::{ExpertRange, NO_EXPERT};
use medley_core::{Rows, RowsMut, bf16};
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
const SENTINEL_ID: u32 = 0xDEAD_BEEF;

/// Deterministic values in `[-1, 1)`.
fn lcg(seed: u32, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) & 0xffff) as f32 / 32768.0 - 1.0
        })
        .collect()
}

fn rows<T>(data: &[T], dtype: medley_dtype, rows: usize, len: usize) -> medley_rows {
    medley_rows {
        data: data.as_ptr().cast(),
        data_len: data.len(),
        dtype: dtype as u32,
        rows,
        len,
        stride: 0,
    }
}

#[test]
fn grouped_topk_matches_the_core_and_fails_cleanly() {
    let (t, e, k) = (9, 64, 8);
    let logits: Vec<bf16> = lcg(1, t * e).iter().map(|&v| bf16::from_f32(4.0 * v)).collect();
    let bias: Vec<f32> = lcg(2, e).iter().map(|&v| 0.1 * v).collect();
    let cfg = init(medley_moe_grouped_config_init);
    assert_eq!(
        (cfg.k, cfg.n_group, cfg.topk_group, cfg.renormalize),
        (8, 8, 4, 1)
    );
    let x = rows(&logits, medley_dtype::Bf16, t, e);
    let mut ids = vec![SENTINEL_ID; t * k];
    let mut w = vec![SENTINEL; t * k];
    let mut rep = init(medley_report_init);
    // SAFETY: every pointer is valid for the length given with it.
    let s = unsafe {
        medley_moe_grouped_topk(
            &x,
            &cfg,
            bias.as_ptr(),
            e,
            ids.as_mut_ptr(),
            t * k,
            w.as_mut_ptr(),
            t * k,
            &mut rep,
        )
    };
    assert_eq!(s, medley_status::Ok);
    let (mut ci, mut cw) = (vec![0u32; t * k], vec![0f32; t * k]);
    let core_cfg = GroupedConfig::deepseek_v3(&bias);
    let crep = grouped_topk(Rows::dense(&logits, t, e).unwrap(), &core_cfg, &mut ci, &mut cw).unwrap();
    assert_eq!(ids, ci);
    assert!(w.iter().zip(&cw).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!((rep.masked_rows, rep.nan_rows), (crep.masked_rows, crep.nan_rows));
    // Without bias, softmax scoring, max group score, f32 logits.
    let lf: Vec<f32> = logits.iter().map(|v| v.to_f32()).collect();
    let xf = rows(&lf, medley_dtype::F32, t, e);
    let c2 = medley_moe_grouped_config {
        scoring: medley_moe_scoring::Softmax as u32,
        group_score: medley_moe_group_score::Max as u32,
        renormalize: 0,
        routed_scaling_factor: 1.0,
        ..cfg
    };
    // SAFETY: as above.
    let s = unsafe {
        medley_moe_grouped_topk(
            &xf,
            &c2,
            null(),
            0,
            ids.as_mut_ptr(),
            t * k,
            w.as_mut_ptr(),
            t * k,
            null_mut(),
        )
    };
    assert_eq!(s, medley_status::Ok);
    let core2 = GroupedConfig {
        scoring: medley_core::moe::gating::Scoring::Softmax,
        group_score: medley_core::moe::gating::GroupScore::Max,
        renormalize: false,
        routed_scaling_factor: 1.0,
        bias: None,
        ..core_cfg
    };
    grouped_topk(Rows::dense(&lf, t, e).unwrap(), &core2, &mut ci, &mut cw).unwrap();
    assert_eq!(ids, ci);
    assert!(w.iter().zip(&cw).all(|(a, b)| a.to_bits() == b.to_bits()));

    // Failures leave every output untouched.
    let mut nan_bias = bias.clone();
    nan_bias[3] = f32::NAN;
    let bad_enum = medley_moe_grouped_config { scoring: 7, ..cfg };
    let bad_groups = medley_moe_grouped_config { n_group: 7, ..cfg };
    let bad_size = medley_moe_grouped_config {
        struct_size: 12,
        ..cfg
    };
    let mut ids = vec![SENTINEL_ID; t * k];
    let mut w = vec![SENTINEL; t * k];
    let (ip, wp) = (ids.as_mut_ptr(), w.as_mut_ptr());
    let cases: [(
        &medley_moe_grouped_config,
        *const f32,
        usize,
        *mut u32,
        usize,
        medley_status,
    ); 7] = [
        (
            &bad_enum,
            bias.as_ptr(),
            e,
            ip,
            t * k,
            medley_status::BadParameter,
        ),
        (
            &bad_groups,
            bias.as_ptr(),
            e,
            ip,
            t * k,
            medley_status::BadParameter,
        ),
        (&bad_size, bias.as_ptr(), e, ip, t * k, medley_status::StructSize),
        (&cfg, bias.as_ptr(), e - 1, ip, t * k, medley_status::BadShape),
        (&cfg, nan_bias.as_ptr(), e, ip, t * k, medley_status::BadParameter),
        (&cfg, bias.as_ptr(), e, ip, t * k - 1, medley_status::BadShape),
        (&cfg, bias.as_ptr(), e, wp.cast(), t * k, medley_status::Overlap),
    ];
    for (i, (c, b, bl, ids_p, il, want)) in cases.into_iter().enumerate() {
        // SAFETY: every pointer is valid for the length given with it.
        let s = unsafe { medley_moe_grouped_topk(&x, c, b, bl, ids_p, il, wp, t * k, &mut rep) };
        assert_eq!(s, want, "case {i}");
        assert!(ids.iter().all(|&v| v == SENTINEL_ID), "case {i} wrote ids");
        assert!(w.iter().all(|&v| v == SENTINEL), "case {i} wrote weights");
    }
    // A bias in an output: overlap.
    // SAFETY: as above.
    let s =
        unsafe { medley_moe_grouped_topk(&x, &cfg, wp.cast_const(), e, ip, t * k, wp, t * k, null_mut()) };
    assert_eq!(s, medley_status::Overlap);
    assert!(w.iter().all(|&v| v == SENTINEL));
}

#[test]
fn the_plan_matches_the_core_and_fails_cleanly() {
    let (t, k, e, bm) = (13, 3, 8, 4);
    let n = t * k;
    let mut ids: Vec<u32> = (0..n).map(|i| ((i * 7 + i / 5) % e) as u32).collect();
    ids[4] = NO_EXPERT;
    // Expert 5 empty.
    for v in ids.iter_mut() {
        if *v == 5 {
            *v = 6;
        }
    }
    let range = medley_moe_range { first: 2, last: 7 };
    let l = 5;
    let (mut len, mut blocks) = (0usize, 0usize);
    // SAFETY: valid out-pointers.
    assert_eq!(
        // SAFETY: valid pointers for the lengths given; device addresses are only checked.
        unsafe { medley_moe_block_padded_len(n, l, bm, &mut len, &mut blocks) },
        medley_status::Ok
    );
    assert_eq!((len, blocks), block_padded_len(n, l, bm).unwrap());
    // SAFETY: the same pointer twice.
    assert_eq!(
        // SAFETY: valid pointers for the lengths given; device addresses are only checked.
        unsafe { medley_moe_block_padded_len(n, l, bm, &mut len, &mut len) },
        medley_status::Overlap
    );
    // SAFETY: valid out-pointers.
    assert_eq!(
        // SAFETY: valid pointers for the lengths given; device addresses are only checked.
        unsafe { medley_moe_block_padded_len(n, l, 0, &mut len, &mut blocks) },
        medley_status::BadParameter
    );
    let mut sorted = vec![SENTINEL_ID; len];
    let mut bexp = vec![SENTINEL_ID; blocks];
    let mut off = vec![7u64; l + 1];
    let mut inv = vec![SENTINEL_ID; n];
    let mut total = SENTINEL_ID;
    let mut out = init(medley_moe_align_output_init);
    out.sorted_ids = sorted.as_mut_ptr();
    out.sorted_ids_len = len;
    out.block_experts = bexp.as_mut_ptr();
    out.block_experts_len = blocks;
    out.offsets = off.as_mut_ptr();
    out.offsets_len = l + 1;
    out.inverse = inv.as_mut_ptr();
    out.inverse_len = n;
    out.total = &mut total;
    // SAFETY: every buffer is valid for its length.
    let s = unsafe { medley_moe_align_block_size(ids.as_ptr(), n, e, range, bm, &out) };
    assert_eq!(s, medley_status::Ok);
    let (mut cs, mut cb, mut co, mut ci) = (
        vec![0u32; len],
        vec![0u32; blocks],
        vec![0u64; l + 1],
        vec![0u32; n],
    );
    let ct = align_block_size(
        &ids,
        e,
        ExpertRange { first: 2, last: 7 },
        bm,
        &mut cs,
        &mut cb,
        &mut co,
        Some(&mut ci),
    )
    .unwrap();
    assert_eq!(
        (sorted.clone(), bexp.clone(), off.clone(), inv.clone()),
        (cs, cb, co, ci)
    );
    assert_eq!(total as u64, ct);
    // Failures leave the outputs untouched.
    let snapshot = (sorted.clone(), bexp.clone(), off.clone(), inv.clone(), total);
    let mut bad_ids = ids.clone();
    bad_ids[0] = 99;
    let short = medley_moe_align_output {
        sorted_ids_len: len - 1,
        ..out
    };
    let aliased = medley_moe_align_output {
        inverse: sorted.as_mut_ptr(),
        inverse_len: n.min(len),
        ..out
    };
    let cases = [
        (
            ids.as_ptr(),
            e,
            medley_moe_range { first: 2, last: 9 },
            bm,
            &out,
            medley_status::BadParameter,
        ),
        (bad_ids.as_ptr(), e, range, bm, &out, medley_status::BadParameter),
        (ids.as_ptr(), e, range, bm, &short, medley_status::BadShape),
        (ids.as_ptr(), 0, range, bm, &out, medley_status::BadShape),
        (ids.as_ptr(), e, range, 0, &out, medley_status::BadParameter),
        (ids.as_ptr(), e, range, bm, &aliased, medley_status::Overlap),
    ];
    for (i, (ip, ee, rg, b, o, want)) in cases.into_iter().enumerate() {
        // SAFETY: every buffer is valid for its length.
        let s = unsafe { medley_moe_align_block_size(ip, n, ee, rg, b, o) };
        assert_eq!(s, want, "case {i}");
        assert_eq!(
            (sorted.clone(), bexp.clone(), off.clone(), inv.clone(), total),
            snapshot,
            "case {i} wrote"
        );
    }
}

/// A small layer: x f32 `[T, H]`, bf16 weights for `L` local experts.
struct LayerCase {
    t: usize,
    h: usize,
    i: usize,
    k: usize,
    e: usize,
    range: ExpertRange,
    x: Vec<f32>,
    w13: Vec<bf16>,
    w2: Vec<bf16>,
    ids: Vec<u32>,
    weights: Vec<f32>,
}

impl LayerCase {
    fn new() -> Self {
        let (t, h, i, k, e) = (11, 16, 8, 2, 6);
        let range = ExpertRange { first: 1, last: 5 };
        let l = range.len();
        let x = lcg(3, t * h);
        let w13 = lcg(4, l * 2 * i * h)
            .iter()
            .map(|&v| bf16::from_f32(0.3 * v))
            .collect();
        let w2 = lcg(5, l * h * i)
            .iter()
            .map(|&v| bf16::from_f32(0.3 * v))
            .collect();
        // Expert 3 gets no slot; expert 0 and 5 are another rank's.
        let mut ids: Vec<u32> = (0..t * k).map(|s| [1u32, 2, 4, 0, 5, 2, 4][s % 7]).collect();
        ids[3] = NO_EXPERT;
        let mut weights: Vec<f32> = (0..t * k).map(|s| 0.25 + 0.05 * (s % 5) as f32).collect();
        weights[6] = 0.0;
        LayerCase {
            t,
            h,
            i,
            k,
            e,
            range,
            x,
            w13,
            w2,
            ids,
            weights,
        }
    }

    fn experts(&self) -> medley_moe_experts {
        medley_moe_experts {
            w13: self.w13.as_ptr().cast(),
            w13_len: self.w13.len(),
            w2: self.w2.as_ptr().cast(),
            w2_len: self.w2.len(),
            dtype: medley_dtype::Bf16 as u32,
            hidden: self.h,
            inter: self.i,
            range: medley_moe_range {
                first: self.range.first,
                last: self.range.last,
            },
        }
    }

    fn routing(&self) -> medley_moe_routing {
        medley_moe_routing {
            ids: self.ids.as_ptr(),
            ids_len: self.ids.len(),
            weights: self.weights.as_ptr(),
            weights_len: self.weights.len(),
            k: self.k,
            experts: self.e,
        }
    }

    /// The core's layer output.
    fn reference(&self) -> (Vec<f32>, medley_core::Report) {
        let n = self.t * self.k;
        let l = self.range.len();
        let (mut sorted, mut off) = (vec![0u32; n], vec![0u64; l + 1]);
        sort_by_expert(&self.ids, self.e, self.range, &mut sorted, &mut off, None).unwrap();
        let mut scratch = vec![0f32; layer_scratch_len(self.t, self.k, self.h, self.i).unwrap()];
        let mut out = vec![0f32; self.t * self.h];
        let rep = moe_layer(
            Rows::dense(&self.x, self.t, self.h).unwrap(),
            &Experts {
                w13: &self.w13,
                w2: &self.w2,
                hidden: self.h,
                inter: self.i,
                range: self.range,
            },
            &Routing {
                ids: &self.ids,
                weights: &self.weights,
                k: self.k,
                experts: self.e,
            },
            &Plan {
                sorted: &sorted,
                offsets: &off,
            },
            &mut scratch,
            RowsMut::dense(&mut out, self.t, self.h).unwrap(),
        )
        .unwrap();
        (out, rep)
    }
}

#[test]
fn the_layer_matches_the_core_and_fails_cleanly() {
    let c = LayerCase::new();
    let mut bytes = 0usize;
    // SAFETY: a valid out-pointer.
    let s = unsafe { medley_moe_layer_scratch_bytes(c.t, c.k, c.h, c.i, c.range.len(), &mut bytes) };
    assert_eq!(s, medley_status::Ok);
    let mut scratch = vec![0u64; bytes.div_ceil(8)];
    let x = rows(&c.x, medley_dtype::F32, c.t, c.h);
    let (ex, ro) = (c.experts(), c.routing());
    let mut out = vec![SENTINEL; c.t * c.h];
    let mut rep = init(medley_report_init);
    // SAFETY: every pointer is valid for the length given with it.
    let s = unsafe {
        medley_moe_layer(
            &x,
            &ex,
            &ro,
            scratch.as_mut_ptr().cast(),
            bytes,
            out.as_mut_ptr().cast(),
            out.len(),
            medley_dtype::F32 as u32,
            0,
            &mut rep,
        )
    };
    assert_eq!(s, medley_status::Ok);
    let (want, wrep) = c.reference();
    assert!(out.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!((rep.masked_rows, rep.nan_rows), (wrep.masked_rows, wrep.nan_rows));
    // bf16 output: the core's f32 result rounded once.
    let mut ob = vec![bf16::from_f32(SENTINEL); c.t * c.h];
    // SAFETY: as above.
    let s = unsafe {
        medley_moe_layer(
            &x,
            &ex,
            &ro,
            scratch.as_mut_ptr().cast(),
            bytes,
            ob.as_mut_ptr().cast(),
            ob.len(),
            medley_dtype::Bf16 as u32,
            0,
            null_mut(),
        )
    };
    assert_eq!(s, medley_status::Ok);
    assert!(ob.iter().zip(&want).all(|(a, b)| *a == bf16::from_f32(*b)));

    // Failures leave `out` and the report untouched.
    let mut out = vec![SENTINEL; c.t * c.h];
    let op = out.as_mut_ptr();
    let mut bad_ids = c.ids.clone();
    bad_ids[1] = 77;
    let ro_bad = medley_moe_routing {
        ids: bad_ids.as_ptr(),
        ..ro
    };
    let ro_k0 = medley_moe_routing { k: 0, ..ro };
    let ex_dt = medley_moe_experts { dtype: 9, ..ex };
    let ex_short = medley_moe_experts {
        w2_len: ex.w2_len - 1,
        ..ex
    };
    let ex_range = medley_moe_experts {
        range: medley_moe_range { first: 4, last: 9 },
        ..ex
    };
    let sp = scratch.as_mut_ptr().cast::<core::ffi::c_void>();
    let cases: [(
        &medley_moe_experts,
        &medley_moe_routing,
        *mut core::ffi::c_void,
        usize,
        *mut f32,
        u32,
        medley_status,
    ); 9] = [
        (&ex, &ro_bad, sp, bytes, op, 0, medley_status::BadParameter),
        (&ex, &ro_k0, sp, bytes, op, 0, medley_status::BadParameter),
        (&ex_dt, &ro, sp, bytes, op, 0, medley_status::BadParameter),
        (&ex_short, &ro, sp, bytes, op, 0, medley_status::BadShape),
        (&ex_range, &ro, sp, bytes, op, 0, medley_status::BadParameter),
        (&ex, &ro, sp, bytes - 8, op, 0, medley_status::BadShape),
        (
            &ex,
            &ro,
            sp.cast::<u8>().wrapping_add(4).cast(),
            bytes - 8,
            op,
            0,
            medley_status::Misaligned,
        ),
        (&ex, &ro, sp, bytes, op, 3, medley_status::BadParameter),
        (
            &ex,
            &ro,
            op.cast(),
            bytes.min(out.len() * 4),
            op,
            0,
            medley_status::Overlap,
        ),
    ];
    rep.masked_rows = 99;
    for (i, (e, r, s_p, s_len, o, odt, want)) in cases.into_iter().enumerate() {
        // SAFETY: every pointer is valid for the length given with it.
        let s = unsafe { medley_moe_layer(&x, e, r, s_p, s_len, o.cast(), c.t * c.h, odt, 0, &mut rep) };
        assert_eq!(s, want, "case {i}");
        assert!(out.iter().all(|&v| v == SENTINEL), "case {i} wrote out");
        assert_eq!(rep.masked_rows, 99, "case {i} wrote the report");
    }
    // Null structs.
    // SAFETY: nulls are checked first.
    let s = unsafe {
        medley_moe_layer(
            null(),
            &ex,
            &ro,
            sp,
            bytes,
            op.cast(),
            c.t * c.h,
            0,
            0,
            null_mut(),
        )
    };
    assert_eq!(s, medley_status::NullArgument);
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use core::ffi::c_void;
    use medley_cuda::experts::{Epilogue, GEMMS, GemmDtype, Generation};

    fn first_gemm(epi: Epilogue) -> u32 {
        GEMMS
            .iter()
            .position(|g| {
                g.epilogue == epi
                    && g.dtype == GemmDtype::BF16
                    && g.generation == Generation::Mma
                    && g.bm == 16
            })
            .unwrap() as u32
    }

    fn drows(data: u64, len: usize, dtype: medley_dtype, rows: usize, cols: usize) -> medley_cuda_rows {
        medley_cuda_rows {
            data,
            data_len: len,
            dtype: dtype as u32,
            rows,
            len: cols,
            stride: 0,
        }
    }

    #[test]
    fn cuda_moe_entry_points_check_arguments_and_report_the_driver() {
        let probe = medley_cuda_probe();
        if probe != medley_status::Ok {
            assert_eq!(probe, medley_status::Driver);
            let code = medley_last_cuda_error();
            assert!(code == 34 || code == 100, "cuInit returned {code}");
            let mut engine = 0x1234 as *mut medley_cuda_engine;
            // SAFETY: the stream is never used (cuInit fails first).
            assert_eq!(
                // SAFETY: valid pointers for the lengths given; device addresses are only checked.
                unsafe { medley_cuda_engine_new(null_mut(), &mut engine) },
                medley_status::Driver
            );
            assert_eq!(medley_last_cuda_error(), code);
            assert_eq!(engine as usize, 0x1234);
        }
        let ne: *const medley_cuda_engine = null();
        let st: *mut c_void = null_mut();
        let cfg = init(medley_moe_grouped_config_init);
        let x = drows(0x10000, 4 * 64, medley_dtype::Bf16, 4, 64);
        // SAFETY (every call below): host structs are valid; device
        // addresses are never dereferenced on the host, and no call gets
        // past its checks without an engine.
        // SAFETY: valid pointers for the lengths given; device addresses are only checked.
        unsafe {
            // Grouped gating: valid arguments stop at the null engine;
            // bad ones fail on themselves first.
            let g = |x: &medley_cuda_rows, c: &medley_moe_grouped_config, bias: u64, ids: u64, wts: u64| {
                medley_cuda_moe_grouped_topk(ne, st, x, c, bias, 64, ids, 32, wts, 32)
            };
            assert_eq!(
                g(&x, &cfg, 0x20000, 0x30000, 0x40000),
                medley_status::NullArgument
            );
            assert_eq!(g(&x, &cfg, 0x20000, 0x30002, 0x40000), medley_status::Misaligned);
            assert_eq!(g(&x, &cfg, 0x20000, 0x30000, 0x30040), medley_status::Overlap);
            assert_eq!(
                g(
                    &x,
                    &medley_moe_grouped_config { scoring: 2, ..cfg },
                    0x20000,
                    0x30000,
                    0x40000
                ),
                medley_status::BadParameter
            );
            assert_eq!(
                g(
                    &x,
                    &medley_moe_grouped_config { n_group: 5, ..cfg },
                    0x20000,
                    0x30000,
                    0x40000
                ),
                medley_status::BadParameter
            );
            assert_eq!(
                g(
                    &x,
                    &medley_moe_grouped_config {
                        struct_size: 1,
                        ..cfg
                    },
                    0x20000,
                    0x30000,
                    0x40000
                ),
                medley_status::StructSize
            );
            let xb = medley_cuda_rows { dtype: 3, ..x };
            assert_eq!(
                g(&xb, &cfg, 0x20000, 0x30000, 0x40000),
                medley_status::BadParameter
            );
            let xs = medley_cuda_rows { data_len: 100, ..x };
            assert_eq!(g(&xs, &cfg, 0x20000, 0x30000, 0x40000), medley_status::BadShape);

            // The plan.
            let (len, blocks) = block_padded_len(32, 8, 16).unwrap();
            let mut ao = init(medley_cuda_moe_align_output_init);
            ao.sorted_ids = 0x100000;
            ao.sorted_ids_len = len;
            ao.block_experts = 0x200000;
            ao.block_experts_len = blocks;
            ao.total = 0x300000;
            ao.inverse = 0x400000;
            ao.inverse_len = 32;
            let all = medley_moe_range { first: 0, last: 8 };
            let a = |ids: u64, rg: medley_moe_range, o: &medley_cuda_moe_align_output| {
                medley_cuda_moe_align(ne, st, ids, 32, 8, rg, 16, o)
            };
            assert_eq!(a(0x500000, all, &ao), medley_status::NullArgument);
            assert_eq!(a(0x500001, all, &ao), medley_status::Misaligned);
            assert_eq!(
                a(0x500000, medley_moe_range { first: 3, last: 9 }, &ao),
                medley_status::BadParameter
            );
            assert_eq!(
                a(
                    0x500000,
                    all,
                    &medley_cuda_moe_align_output {
                        sorted_ids_len: len + 1,
                        ..ao
                    }
                ),
                medley_status::BadShape
            );
            assert_eq!(
                a(0x500000, all, &medley_cuda_moe_align_output { total: 0, ..ao }),
                medley_status::NullArgument
            );
            assert_eq!(a(0x100000, all, &ao), medley_status::Overlap);

            // Permute, GEMMs, combine.
            let out = drows(0x600000, len * 64, medley_dtype::Bf16, len, 64);
            assert_eq!(
                medley_cuda_moe_permute(ne, st, &x, 8, 0x100000, len, 0x300000, &out),
                medley_status::NullArgument
            );
            assert_eq!(
                medley_cuda_moe_permute(ne, st, &x, 0, 0x100000, len, 0x300000, &out),
                medley_status::BadParameter
            );
            assert_eq!(
                medley_cuda_moe_permute(ne, st, &x, 8, 0x600000, len, 0x300000, &out),
                medley_status::Overlap
            );
            let plan = medley_cuda_moe_plan {
                sorted_ids: 0x100000,
                sorted_ids_len: len,
                block_experts: 0x200000,
                block_experts_len: blocks,
                total: 0x300000,
                block_m: 16,
                slots: 32,
                k: 8,
            };
            let w13 = drows(0x800000, 8 * 64 * 64, medley_dtype::Bf16, 8 * 64, 64);
            let act = drows(0xA00000, len * 32, medley_dtype::Bf16, len, 32);
            let g1 = first_gemm(Epilogue::SwiGlu);
            assert_eq!(
                medley_cuda_moe_gemm1(ne, st, g1, &x, 0, &plan, &w13, &act),
                medley_status::NullArgument
            );
            assert_eq!(
                medley_cuda_moe_gemm1(ne, st, 60000, &x, 0, &plan, &w13, &act),
                medley_status::BadParameter
            );
            let act32 = medley_cuda_rows {
                dtype: medley_dtype::F32 as u32,
                ..act
            };
            assert_eq!(
                medley_cuda_moe_gemm1(ne, st, g1, &x, 0, &plan, &w13, &act32),
                medley_status::Unsupported
            );
            let y = drows(0xC00000, len * 64, medley_dtype::F32, len, 64);
            let w2 = drows(0xE00000, 8 * 64 * 32, medley_dtype::Bf16, 8 * 64, 32);
            let g2 = first_gemm(Epilogue::Down);
            assert_eq!(
                medley_cuda_moe_gemm2(ne, st, g2, &act, &plan, &w2, 0x1000000, 32, &y),
                medley_status::NullArgument
            );
            assert_eq!(
                medley_cuda_moe_gemm2(ne, st, g2, &act, &plan, &w2, 0x1000000, 32, &act),
                medley_status::Overlap
            );
            let out_t = drows(0x1100000, 4 * 64, medley_dtype::F32, 4, 64);
            assert_eq!(
                medley_cuda_moe_combine(ne, st, &y, 8, 0x400000, 32, 0x1000000, 32, 1, &out_t),
                medley_status::NullArgument
            );
            assert_eq!(
                medley_cuda_moe_combine(ne, st, &y, 33, 0x400000, 32, 0x1000000, 32, 1, &out_t),
                medley_status::BadShape
            );
            assert_eq!(
                medley_cuda_moe_combine(ne, st, &y, 8, 0x400000, 32, 0x1000000, 32, 1, &x),
                medley_status::Unsupported
            );

            // The choice and the layer.
            let mut choice = init(medley_cuda_moe_choice_init);
            choice.gemm1 = 7;
            assert_eq!(
                medley_cuda_moe_choose(ne, 2, 32, 8, 0, &mut choice),
                medley_status::NullArgument
            );
            assert_eq!(
                medley_cuda_moe_choose(ne, 0, 32, 8, 0, &mut choice),
                medley_status::Unsupported
            );
            assert_eq!(
                medley_cuda_moe_choose(ne, 2, 32, 8, 5, &mut choice),
                medley_status::BadParameter
            );
            assert_eq!(choice.gemm1, 7, "a failed choose wrote");
            let choice = medley_cuda_moe_choice {
                gemm1: g1,
                gemm2: g2,
                block_m: 16,
                ..init(medley_cuda_moe_choice_init)
            };
            let mut bytes = 5usize;
            assert_eq!(
                medley_cuda_moe_layer_workspace_bytes(&choice, 4, 8, 8, 64, 32, 2, &mut bytes),
                medley_status::Ok
            );
            assert!(bytes > 5);
            let mut b2 = 5usize;
            let bad = medley_cuda_moe_choice { gemm1: g2, ..choice };
            assert_eq!(
                medley_cuda_moe_layer_workspace_bytes(&bad, 4, 8, 8, 64, 32, 2, &mut b2),
                medley_status::Unsupported
            );
            let bad = medley_cuda_moe_choice { block_m: 8, ..choice };
            assert_eq!(
                medley_cuda_moe_layer_workspace_bytes(&bad, 4, 8, 8, 64, 32, 2, &mut b2),
                medley_status::BadParameter
            );
            assert_eq!(
                medley_cuda_moe_layer_workspace_bytes(&choice, 4, 8, 8, 64, 32, 0, &mut b2),
                medley_status::Unsupported
            );
            assert_eq!(b2, 5);
            let ex = medley_cuda_moe_experts {
                w13: 0x800000,
                w13_len: 8 * 64 * 64,
                w2: 0xE00000,
                w2_len: 8 * 64 * 32,
                dtype: medley_dtype::Bf16 as u32,
                hidden: 64,
                inter: 32,
                range: all,
            };
            let ro = medley_cuda_moe_routing {
                ids: 0x500000,
                ids_len: 32,
                weights: 0x1000000,
                weights_len: 32,
                k: 8,
                experts: 8,
            };
            let l = |ex: &medley_cuda_moe_experts, ro: &medley_cuda_moe_routing, ws: u64, wl: usize| {
                medley_cuda_moe_layer(ne, st, &x, ex, ro, &choice, ws, wl, &out_t)
            };
            assert_eq!(l(&ex, &ro, 0x2000000, bytes), medley_status::NullArgument);
            assert_eq!(l(&ex, &ro, 0x2000000, bytes - 1), medley_status::BadShape);
            assert_eq!(l(&ex, &ro, 0x2000008, bytes), medley_status::Misaligned);
            assert_eq!(
                l(
                    &medley_cuda_moe_experts { inter: 12, ..ex },
                    &ro,
                    0x2000000,
                    bytes
                ),
                medley_status::BadParameter
            );
            assert_eq!(
                l(
                    &medley_cuda_moe_experts { w2_len: 1, ..ex },
                    &ro,
                    0x2000000,
                    bytes
                ),
                medley_status::BadShape
            );
            assert_eq!(
                l(
                    &ex,
                    &medley_cuda_moe_routing { ids_len: 31, ..ro },
                    0x2000000,
                    bytes
                ),
                medley_status::BadShape
            );
            assert_eq!(l(&ex, &ro, 0x1100000, bytes), medley_status::Overlap);
        }
        if probe == medley_status::Ok {
            end_to_end();
        }
    }

    unsafe extern "C" {
        fn cuDeviceGet(dev: *mut i32, ordinal: i32) -> i32;
        fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, dev: i32) -> i32;
        fn cuDevicePrimaryCtxRelease_v2(dev: i32) -> i32;
        fn cuCtxPushCurrent_v2(ctx: *mut c_void) -> i32;
        fn cuCtxPopCurrent_v2(ctx: *mut *mut c_void) -> i32;
        fn cuStreamCreate(stream: *mut *mut c_void, flags: u32) -> i32;
        fn cuStreamDestroy_v2(stream: *mut c_void) -> i32;
        fn cuStreamSynchronize(stream: *mut c_void) -> i32;
        fn cuMemAlloc_v2(ptr: *mut u64, bytes: usize) -> i32;
        fn cuMemFree_v2(ptr: u64) -> i32;
        fn cuMemcpyHtoDAsync_v2(dst: u64, src: *const c_void, bytes: usize, stream: *mut c_void) -> i32;
        fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: u64, bytes: usize, stream: *mut c_void) -> i32;
    }

    struct Mem(Vec<u64>);
    impl Mem {
        fn alloc(&mut self, bytes: usize) -> u64 {
            let mut p = 0u64;
            // SAFETY: a valid out-pointer.
            assert_eq!(unsafe { cuMemAlloc_v2(&mut p, bytes.max(16)) }, 0);
            self.0.push(p);
            p
        }
        fn upload<T>(&mut self, v: &[T], st: *mut c_void) -> u64 {
            let p = self.alloc(size_of_val(v));
            // SAFETY: p holds the bytes; v outlives the synchronization below.
            assert_eq!(
                // SAFETY: valid pointers for the lengths given; device addresses are only checked.
                unsafe { cuMemcpyHtoDAsync_v2(p, v.as_ptr().cast(), size_of_val(v), st) },
                0
            );
            // SAFETY: a valid stream.
            assert_eq!(unsafe { cuStreamSynchronize(st) }, 0);
            p
        }
    }
    impl Drop for Mem {
        fn drop(&mut self) {
            for &p in &self.0 {
                // SAFETY: allocated by cuMemAlloc.
                unsafe { cuMemFree_v2(p) };
            }
        }
    }

    fn download<T: Copy + Default>(p: u64, n: usize, st: *mut c_void) -> Vec<T> {
        let mut v = vec![T::default(); n];
        // SAFETY: p holds n elements; synchronized before v is read.
        unsafe {
            assert_eq!(
                cuMemcpyDtoHAsync_v2(v.as_mut_ptr().cast(), p, size_of_val(&v[..]), st),
                0
            );
            assert_eq!(cuStreamSynchronize(st), 0);
        }
        v
    }

    /// One layer on the GPU (grouped gating, the plan, the layer in one
    /// call) against the CPU entry points.
    fn end_to_end() {
        let (t, e, k, h, i) = (37usize, 16usize, 4usize, 256usize, 128usize);
        let mut dev = 0;
        let mut ctx = null_mut();
        let mut st = null_mut();
        // SAFETY: driver calls with valid out-pointers.
        unsafe {
            assert_eq!(cuDeviceGet(&mut dev, 0), 0);
            assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, dev), 0);
            assert_eq!(cuCtxPushCurrent_v2(ctx), 0);
            assert_eq!(cuStreamCreate(&mut st, 1), 0);
        }
        let mut engine: *mut medley_cuda_engine = null_mut();
        // SAFETY: a valid stream and out-pointer.
        assert_eq!(
            // SAFETY: valid pointers for the lengths given; device addresses are only checked.
            unsafe { medley_cuda_engine_new(st, &mut engine) },
            medley_status::Ok
        );
        {
            let mut mem = Mem(Vec::new());
            let logits: Vec<bf16> = lcg(11, t * e).iter().map(|&v| bf16::from_f32(3.0 * v)).collect();
            let bias: Vec<f32> = lcg(12, e).iter().map(|&v| 0.05 * v).collect();
            let x: Vec<bf16> = lcg(13, t * h).iter().map(|&v| bf16::from_f32(v)).collect();
            let range = ExpertRange { first: 4, last: 16 };
            let l = range.len();
            let w13: Vec<bf16> = lcg(14, l * 2 * i * h)
                .iter()
                .map(|&v| bf16::from_f32(0.2 * v))
                .collect();
            let w2: Vec<bf16> = lcg(15, l * h * i)
                .iter()
                .map(|&v| bf16::from_f32(0.2 * v))
                .collect();
            let cfg = medley_moe_grouped_config {
                k,
                n_group: 4,
                topk_group: 2,
                ..init(medley_moe_grouped_config_init)
            };
            // CPU gating, plan, layer.
            let hx = rows(&logits, medley_dtype::Bf16, t, e);
            let (mut cids, mut cw) = (vec![0u32; t * k], vec![0f32; t * k]);
            // SAFETY: valid buffers.
            let s = unsafe {
                medley_moe_grouped_topk(
                    &hx,
                    &cfg,
                    bias.as_ptr(),
                    e,
                    cids.as_mut_ptr(),
                    t * k,
                    cw.as_mut_ptr(),
                    t * k,
                    null_mut(),
                )
            };
            assert_eq!(s, medley_status::Ok);
            // GPU gating.
            let (dl, db) = (mem.upload(&logits, st), mem.upload(&bias, st));
            let (dids, dw) = (mem.alloc(t * k * 4), mem.alloc(t * k * 4));
            let dx_logits = drows(dl, logits.len(), medley_dtype::Bf16, t, e);
            // SAFETY: device buffers of the lengths given.
            let s = unsafe {
                medley_cuda_moe_grouped_topk(engine, st, &dx_logits, &cfg, db, e, dids, t * k, dw, t * k)
            };
            assert_eq!(s, medley_status::Ok);
            let gids: Vec<u32> = download(dids, t * k, st);
            let gw: Vec<f32> = download(dw, t * k, st);
            assert_eq!(gids, cids);
            assert!(gw.iter().zip(&cw).all(|(a, b)| a.to_bits() == b.to_bits()));
            // The layer on the GPU.
            let mut choice = init(medley_cuda_moe_choice_init);
            // SAFETY: a live engine, a valid out-struct.
            assert_eq!(
                // SAFETY: valid pointers for the lengths given; device addresses are only checked.
                unsafe { medley_cuda_moe_choose(engine, 2, t * k, l, 0, &mut choice) },
                medley_status::Ok
            );
            let mut bytes = 0usize;
            // SAFETY: valid structs.
            assert_eq!(
                // SAFETY: valid pointers for the lengths given; device addresses are only checked.
                unsafe { medley_cuda_moe_layer_workspace_bytes(&choice, t, k, l, h, i, 2, &mut bytes) },
                medley_status::Ok
            );
            let ws = mem.alloc(bytes);
            let (dx, d13, d2) = (mem.upload(&x, st), mem.upload(&w13, st), mem.upload(&w2, st));
            let dout = mem.alloc(t * h * 4);
            let ex = medley_cuda_moe_experts {
                w13: d13,
                w13_len: w13.len(),
                w2: d2,
                w2_len: w2.len(),
                dtype: medley_dtype::Bf16 as u32,
                hidden: h,
                inter: i,
                range: medley_moe_range { first: 4, last: 16 },
            };
            let ro = medley_cuda_moe_routing {
                ids: dids,
                ids_len: t * k,
                weights: dw,
                weights_len: t * k,
                k,
                experts: e,
            };
            let xv = drows(dx, x.len(), medley_dtype::Bf16, t, h);
            let ov = drows(dout, t * h, medley_dtype::F32, t, h);
            // SAFETY: device buffers of the lengths given.
            let s = unsafe { medley_cuda_moe_layer(engine, st, &xv, &ex, &ro, &choice, ws, bytes, &ov) };
            assert_eq!(s, medley_status::Ok);
            let got: Vec<f32> = download(dout, t * h, st);
            // The CPU layer over the same routing.
            let hex = medley_moe_experts {
                w13: w13.as_ptr().cast(),
                w13_len: w13.len(),
                w2: w2.as_ptr().cast(),
                w2_len: w2.len(),
                dtype: medley_dtype::Bf16 as u32,
                hidden: h,
                inter: i,
                range: medley_moe_range { first: 4, last: 16 },
            };
            let hro = medley_moe_routing {
                ids: cids.as_ptr(),
                ids_len: t * k,
                weights: cw.as_ptr(),
                weights_len: t * k,
                k,
                experts: e,
            };
            let mut sb = 0usize;
            // SAFETY: a valid out-pointer.
            assert_eq!(
                // SAFETY: valid pointers for the lengths given; device addresses are only checked.
                unsafe { medley_moe_layer_scratch_bytes(t, k, h, i, l, &mut sb) },
                medley_status::Ok
            );
            let mut scratch = vec![0u64; sb.div_ceil(8)];
            let mut want = vec![0f32; t * h];
            let hxx = rows(&x, medley_dtype::Bf16, t, h);
            // SAFETY: valid host buffers.
            let s = unsafe {
                medley_moe_layer(
                    &hxx,
                    &hex,
                    &hro,
                    scratch.as_mut_ptr().cast(),
                    sb,
                    want.as_mut_ptr().cast(),
                    t * h,
                    0,
                    0,
                    null_mut(),
                )
            };
            assert_eq!(s, medley_status::Ok);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 2e-2 * scale + 1e-3, "out[{j}]: GPU {g}, CPU {w}");
            }
        }
        // SAFETY: the engine is live and its work finished; then teardown.
        unsafe {
            assert_eq!(cuStreamSynchronize(st), 0);
            assert_eq!(medley_cuda_engine_destroy(engine), medley_status::Ok);
            assert_eq!(cuStreamDestroy_v2(st), 0);
            let mut popped = null_mut();
            assert_eq!(cuCtxPopCurrent_v2(&mut popped), 0);
            assert_eq!(cuDevicePrimaryCtxRelease_v2(dev), 0);
        }
    }
}
