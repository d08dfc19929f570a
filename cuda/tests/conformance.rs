//! The conformance suite: one list of cases, run on the CPU core
//! (`medley_core::ensemble::combine`) and on every GPU kernel version, each
//! checked against the f64 reference of the core's tests
//! (`core/tests/common`). GPU outputs start poisoned (a NaN payload no
//! kernel writes), so an element left unwritten fails the case.
//!
//! Every GPU run is repeated with the per-row uncertainty outputs (entropy,
//! top-1 probability, margin and, in linear mode, disagreement) requested:
//! the other outputs must stay bit-identical to the plain run, and the
//! uncertainty values must match the core's (relative tolerance 1e-4, NaN
//! exactly where the core has NaN). A few extra cases with NaN rows run in
//! this comparison only.
//!
//! Without a CUDA device the GPU half reports that it was skipped and why;
//! the CPU half always runs.

#![allow(clippy::needless_range_loop)]

#[path = "../../core/tests/common/mod.rs"]
mod common;

use common::{Gen, RefMode, RefModel, assert_logprobs_close, combine_row as ref_row, plaus_margin};
use cust::memory::{CopyDestination, DeviceBuffer};
use half::{bf16, f16};
use medley_core::ensemble::{
    Config, Logits, MaskRule, Mode, Model, NO_TOKEN, Output, Plausibility, Weights, combine,
};
use medley_core::sample::{Sampled, Sampling, combine_sample};
use medley_core::{Rows, RowsMut};
use medley_cuda::ensemble::{DeviceConfig, DeviceLogits, DeviceModel, DeviceOutput, DeviceWeights, Version};
mod calls;
use calls::gpu_combine;
use medley_core::Error;
use medley_cuda::mem::{DeviceRows, DeviceRowsMut, DeviceSlice, DeviceSliceMut};
use medley_cuda::{CudaError, Kernels, Launch, Stream};

/// The bit pattern outputs are poisoned with (a NaN no kernel produces).
const POISON: u32 = 0x7FA5_A5A5;

#[derive(Debug, Clone)]
struct Case {
    name: String,
    b: usize,
    v: usize,
    vms: Vec<usize>,
    strides: Vec<usize>,
    temps: Vec<f32>,
    /// Logits as f32 already rounded to the case's dtype.
    data: Vec<Vec<f32>>,
    dtype: u8,
    weights: Vec<f32>,
    per_row: bool,
    mode: Mode,
    mask_rule: MaskRule,
    t_out: f32,
    plaus: Option<(usize, f32)>,
    want_log: bool,
    want_prob: bool,
    /// Some rows hold NaN logits (only the uncertainty comparison runs: the
    /// f64 reference has no NaN rows).
    nan_rows: bool,
}

fn round_to(dtype: u8, x: f32) -> f32 {
    match dtype {
        1 => f16::from_f32(x).to_f32(),
        2 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

impl Case {
    fn m(&self) -> usize {
        self.vms.len()
    }

    fn random(seed: u64, max_v: usize, max_m: usize) -> Case {
        let mut g = Gen(seed);
        let m = 1 + g.below(max_m);
        let b = 1 + g.below(4);
        let v = 1 + g.below(max_v);
        let mode = if g.chance(0.5) {
            Mode::Linear
        } else {
            Mode::LogLinear
        };
        let dtype = g.below(3) as u8;
        let vms: Vec<usize> = (0..m)
            .map(|_| if g.chance(0.3) { 1 + g.below(v) } else { v })
            .collect();
        // Half the cases pad rows to 16-byte multiples (v2 runs on those).
        let align16 = g.chance(0.5);
        let strides: Vec<usize> = vms
            .iter()
            .map(|&x| {
                if align16 {
                    (x + g.below(9)).next_multiple_of(8)
                } else {
                    x + if g.chance(0.4) { g.below(9) } else { 0 }
                }
            })
            .collect();
        let temps = (0..m)
            .map(|_| {
                if g.chance(0.5) {
                    1.0
                } else {
                    g.range(0.3, 3.0) as f32
                }
            })
            .collect();
        let p_mask = if g.chance(0.5) { 0.0 } else { 0.1 };
        let data = (0..m)
            .map(|i| {
                (0..(b - 1) * strides[i] + vms[i])
                    .map(|_| round_to(dtype, g.logit(12.0, p_mask)))
                    .collect()
            })
            .collect();
        let per_row = g.chance(0.3);
        let nw = if per_row { b * m } else { m };
        let mut weights: Vec<f32> = (0..nw)
            .map(|_| match mode {
                _ if g.chance(0.2) => 0.0,
                Mode::Linear => g.range(0.05, 2.0) as f32,
                Mode::LogLinear => g.range(-1.5, 1.5) as f32,
            })
            .collect();
        if mode == Mode::Linear {
            for r in 0..(if per_row { b } else { 1 }) {
                if weights[r * m..(r + 1) * m].iter().all(|&w| w == 0.0) {
                    weights[r * m] = 1.0;
                }
            }
        }
        let want_log = g.chance(0.8);
        Case {
            name: format!("random seed {seed:#x}"),
            b,
            v,
            vms,
            strides,
            temps,
            data,
            dtype,
            weights,
            per_row,
            mode,
            mask_rule: if g.chance(0.3) {
                MaskRule::Any
            } else {
                MaskRule::All
            },
            t_out: if g.chance(0.6) {
                1.0
            } else {
                g.range(0.5, 2.0) as f32
            },
            plaus: if g.chance(0.3) {
                Some((g.below(m), [0.0, 0.05, 0.1, 0.5][g.below(4)]))
            } else {
                None
            },
            want_log,
            want_prob: !want_log || g.chance(0.5),
            nan_rows: false,
        }
    }

    /// A dense case with the given shape and mode and otherwise default settings.
    fn dense(name: &str, seed: u64, m: usize, b: usize, v: usize, mode: Mode, dtype: u8) -> Case {
        let mut g = Gen(seed);
        let data = (0..m)
            .map(|_| (0..b * v).map(|_| round_to(dtype, g.logit(10.0, 0.01))).collect())
            .collect();
        Case {
            name: name.to_string(),
            b,
            v,
            vms: vec![v; m],
            strides: vec![v; m],
            temps: vec![1.0; m],
            data,
            dtype,
            weights: (0..m)
                .map(|i| match mode {
                    Mode::Linear => 1.0 + i as f32,
                    Mode::LogLinear => {
                        if i == m - 1 && m > 1 {
                            -0.5
                        } else {
                            1.0
                        }
                    }
                })
                .collect(),
            per_row: false,
            mode,
            mask_rule: MaskRule::All,
            t_out: 1.0,
            plaus: None,
            want_log: true,
            want_prob: true,
            nan_rows: false,
        }
    }

    fn config(&self) -> Config<'_> {
        Config {
            mode: self.mode,
            weights: if self.per_row {
                Weights::PerRow(Rows::dense(&self.weights, self.b, self.m()).unwrap())
            } else {
                Weights::PerModel(&self.weights)
            },
            out_temperature: self.t_out,
            plausibility: self.plaus.map(|(model, alpha)| Plausibility { model, alpha }),
            mask_rule: self.mask_rule,
        }
    }
}

/// Outputs of one backend for one case (absent outputs are empty).
#[derive(Debug, Default)]
struct Outs {
    lp: Vec<f32>,
    p: Vec<f32>,
    am: Vec<u32>,
    lz: Vec<f32>,
    /// Entropy, top-1 probability, margin, disagreement (as `UNC`).
    unc: [Vec<f32>; 4],
}

/// The per-row uncertainty outputs, in `Outs::unc` order.
const UNC: [&str; 4] = ["entropy", "top1_prob", "margin", "disagreement"];

/// Relative tolerance of the GPU's uncertainty values against the core's
/// (f32 math in a different summation order).
const UNC_TOL: f32 = 1e-4;

fn run_cpu(c: &Case) -> Outs {
    let f16s: Vec<Vec<f16>> = c
        .data
        .iter()
        .map(|r| r.iter().map(|&x| f16::from_f32(x)).collect())
        .collect();
    let bf16s: Vec<Vec<bf16>> = c
        .data
        .iter()
        .map(|r| r.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let models: Vec<Model<'_>> = (0..c.m())
        .map(|i| {
            let logits: Logits<'_> = match c.dtype {
                1 => Rows::new(&f16s[i][..], c.b, c.vms[i], c.strides[i])
                    .unwrap()
                    .into(),
                2 => Rows::new(&bf16s[i][..], c.b, c.vms[i], c.strides[i])
                    .unwrap()
                    .into(),
                _ => Rows::new(&c.data[i][..], c.b, c.vms[i], c.strides[i])
                    .unwrap()
                    .into(),
            };
            Model {
                logits,
                temperature: c.temps[i],
            }
        })
        .collect();
    let linear = c.mode == Mode::Linear;
    let mut o = Outs {
        lp: vec![0.0; c.b * c.v],
        p: vec![0.0; c.b * c.v],
        am: vec![0; c.b],
        lz: vec![0.0; c.b],
        unc: [(); 4].map(|_| vec![0.0; c.b]),
    };
    let [h, t1, mg, js] = &mut o.unc;
    let out = Output {
        log_probs: c.want_log.then(|| RowsMut::dense(&mut o.lp, c.b, c.v).unwrap()),
        probs: c.want_prob.then(|| RowsMut::dense(&mut o.p, c.b, c.v).unwrap()),
        argmax: Some(&mut o.am),
        log_normalizer: Some(&mut o.lz),
        entropy: Some(h),
        top1_prob: Some(t1),
        margin: Some(mg),
        disagreement: linear.then_some(&mut js[..]),
    };
    combine(&models, &c.config(), out).expect("valid case");
    if !linear {
        o.unc[3].clear();
    }
    if !c.want_log {
        o.lp.clear();
    }
    if !c.want_prob {
        o.p.clear();
    }
    o
}

/// The case's models as f64 reference models.
fn ref_models(c: &Case) -> Vec<RefModel> {
    (0..c.m())
        .map(|i| RefModel {
            rows: (0..c.b)
                .map(|r| {
                    c.data[i][r * c.strides[i]..r * c.strides[i] + c.vms[i]]
                        .iter()
                        .map(|&x| x as f64)
                        .collect()
                })
                .collect(),
            t: c.temps[i] as f64,
        })
        .collect()
}

/// Whether a token of some row sits on the plausibility cut (rounding may
/// decide it, so backends may legitimately differ).
fn plaus_on_cut(c: &Case, refs: &[RefModel]) -> bool {
    c.plaus
        .is_some_and(|(j, alpha)| (0..c.b).any(|b| plaus_margin(&refs[j], b, alpha as f64, c.v) < 1e-3))
}

/// Checks one backend's outputs against the f64 reference.
fn check(c: &Case, o: &Outs, backend: &str) -> Result<(), String> {
    let refs = ref_models(c);
    if plaus_on_cut(c, &refs) {
        return Ok(()); // a token sits on the cut: rounding may decide it
    }
    let mode = match c.mode {
        Mode::Linear => RefMode::Linear {
            mask_any: c.mask_rule == MaskRule::Any,
        },
        Mode::LogLinear => RefMode::LogLinear,
    };
    let ctx = |b: usize, what: String| format!("{backend}: {} row {b}: {what}", c.name);
    for b in 0..c.b {
        let w: Vec<f64> = if c.per_row {
            c.weights[b * c.m()..(b + 1) * c.m()]
                .iter()
                .map(|&x| x as f64)
                .collect()
        } else {
            c.weights.iter().map(|&x| x as f64).collect()
        };
        let want = ref_row(
            &refs,
            b,
            &w,
            mode,
            c.t_out as f64,
            c.plaus.map(|(j, a)| (j, a as f64)),
            c.v,
        );
        let lp = (!o.lp.is_empty()).then(|| &o.lp[b * c.v..(b + 1) * c.v]);
        let p = (!o.p.is_empty()).then(|| &o.p[b * c.v..(b + 1) * c.v]);
        match want {
            None => {
                if lp.is_some_and(|lp| !lp.iter().all(|&x| x == f32::NEG_INFINITY)) {
                    return Err(ctx(b, "masked row has finite log-probs".into()));
                }
                if p.is_some_and(|p| !p.iter().all(|&x| x == 0.0)) {
                    return Err(ctx(b, "masked row has nonzero probs".into()));
                }
                if o.am[b] != NO_TOKEN || o.lz[b] != f32::NEG_INFINITY {
                    return Err(ctx(b, format!("masked row: argmax {} lz {}", o.am[b], o.lz[b])));
                }
            }
            Some((want, log_z)) => {
                if let Some(lp) = lp {
                    assert_logprobs_close(lp, &want, 3e-4, 3e-5, 2e-4).map_err(|e| ctx(b, e))?;
                    let s: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
                    if (s - 1.0).abs() > 2e-5 {
                        return Err(ctx(b, format!("log-probs sum to {s}")));
                    }
                }
                if let Some(p) = p {
                    let s: f64 = p.iter().map(|&x| x as f64).sum();
                    if (s - 1.0).abs() > 2e-5 || p.iter().any(|x| x.is_nan()) {
                        return Err(ctx(b, format!("probs sum to {s}")));
                    }
                    let (mut num, mut den) = (0.0, 0.0);
                    for (&g, &w) in p.iter().zip(&want) {
                        num += (g as f64 - w.exp()).powi(2);
                        den += w.exp().powi(2);
                    }
                    if (num / den).sqrt() > 2e-4 {
                        return Err(ctx(b, format!("probs relative error {}", (num / den).sqrt())));
                    }
                }
                let a = o.am[b] as usize;
                let best = want.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if a >= c.v || want[a] < best - 1e-4 * (1.0 + best.abs()) {
                    return Err(ctx(b, format!("argmax {a} is not a maximal token")));
                }
                if (o.lz[b] as f64 - log_z).abs() > 2e-4 + 2e-5 * log_z.abs() {
                    return Err(ctx(b, format!("log-normalizer {} vs {log_z}", o.lz[b])));
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// GPU backend (tests own their context, stream and buffers; the library
// never does).

struct Gpu {
    kernels: Kernels,
    stream: cust::stream::Stream,
    _ctx: cust::context::Context,
}

fn gpu() -> Option<Gpu> {
    // Skips only without a driver or a device (34, 100), and never under
    // MEDLEY_REQUIRE_GPU=1; every other failure fails the test.
    if let Err(e) = medley_cuda::probe() {
        let no_gpu = e.code == 34 || e.code == 100;
        if no_gpu && !medley_cuda::owned::gpu_required() {
            eprintln!("GPU half skipped: no usable CUDA driver or device ({e})");
            return None;
        }
        panic!(
            "cuInit failed ({e}); MEDLEY_REQUIRE_GPU={:?}",
            std::env::var("MEDLEY_REQUIRE_GPU")
        );
    }
    let ctx = cust::quick_init().expect("a CUDA context on device 0");
    let t0 = std::time::Instant::now();
    let kernels = Kernels::load().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("Kernels::load: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    let stream = cust::stream::Stream::new(cust::stream::StreamFlags::DEFAULT, None).expect("stream");
    eprintln!(
        "GPU: compute capability {:?}, {} SMs; ensemble_v1 {} regs",
        kernels.compute_capability(),
        kernels.sm_count(),
        kernels.info(medley_cuda::Kernel::EnsembleV1).registers
    );
    Some(Gpu {
        kernels,
        stream,
        _ctx: ctx,
    })
}

/// A read-only view of a test buffer as elements of `T`.
fn view<T, B: cust::memory::DeviceCopy>(buf: &DeviceBuffer<B>, n: usize) -> DeviceSlice<'_, T> {
    // SAFETY: the view borrows `buf`, which stays allocated while the view
    // lives; the tests synchronize the stream before the buffer is dropped.
    unsafe { DeviceSlice::from_raw(buf.as_device_ptr().as_raw(), n) }
}

/// A writable view of a test buffer as elements of `T`.
fn view_mut<T, B: cust::memory::DeviceCopy>(buf: &DeviceBuffer<B>, n: usize) -> DeviceSliceMut<'_, T> {
    // SAFETY: as `view`; each output buffer is written by one launch only.
    unsafe { DeviceSliceMut::from_raw(buf.as_device_ptr().as_raw(), n) }
}

fn poisoned(n: usize) -> DeviceBuffer<u32> {
    DeviceBuffer::from_slice(&vec![POISON; n.max(1)]).expect("alloc")
}

/// One GPU run of `c`; with `unc`, the uncertainty outputs too (poisoned
/// first; disagreement in linear mode).
fn run_gpu(g: &Gpu, c: &Case, version: Version, ws: &DeviceBuffer<u8>, unc: bool) -> Result<Outs, String> {
    // Upload logits in their dtype.
    let bufs: Vec<DeviceBuffer<u32>> = Vec::new();
    let mut dev16: Vec<DeviceBuffer<u16>> = Vec::new();
    let mut dev32: Vec<DeviceBuffer<f32>> = Vec::new();
    for d in &c.data {
        match c.dtype {
            1 => dev16.push(
                DeviceBuffer::from_slice(&d.iter().map(|&x| f16::from_f32(x).to_bits()).collect::<Vec<_>>())
                    .unwrap(),
            ),
            2 => dev16.push(
                DeviceBuffer::from_slice(&d.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<_>>())
                    .unwrap(),
            ),
            _ => dev32.push(DeviceBuffer::from_slice(d).unwrap()),
        }
    }
    drop(bufs);
    let models: Vec<DeviceModel<'_>> = (0..c.m())
        .map(|i| {
            let (rows, len, stride) = (c.b, c.vms[i], c.strides[i]);
            let n = c.data[i].len();
            let logits = match c.dtype {
                1 => DeviceLogits::F16(DeviceRows::new(view(&dev16[i], n), rows, len, stride).unwrap()),
                2 => DeviceLogits::BF16(DeviceRows::new(view(&dev16[i], n), rows, len, stride).unwrap()),
                _ => DeviceLogits::F32(DeviceRows::new(view(&dev32[i], n), rows, len, stride).unwrap()),
            };
            DeviceModel {
                logits,
                temperature: c.temps[i],
            }
        })
        .collect();
    // Output rows padded to a multiple of 8 elements (16-byte aligned rows).
    let os = c.v.next_multiple_of(8);
    let n = c.b * os;
    let lp = poisoned(n);
    let p = poisoned(n);
    let am = poisoned(c.b);
    let lz = poisoned(c.b);
    let ub: [DeviceBuffer<u32>; 4] = [(); 4].map(|_| poisoned(c.b));
    let want_unc = |k: usize| unc && (k < 3 || c.mode == Mode::Linear);
    let wt = DeviceBuffer::from_slice(&c.weights).unwrap();
    // SAFETY (all views below): the buffers live until after the stream is
    // synchronized, and each is used by this one launch only.
    let weights = if c.per_row {
        DeviceWeights::PerRow(DeviceRows::dense(view(&wt, c.weights.len()), c.b, c.m()).unwrap())
    } else {
        DeviceWeights::PerModel(&c.weights)
    };
    let mut cfg = DeviceConfig::new(c.mode, weights);
    cfg.out_temperature = c.t_out;
    cfg.plausibility = c.plaus.map(|(model, alpha)| Plausibility { model, alpha });
    cfg.mask_rule = c.mask_rule;
    let out = DeviceOutput {
        log_probs: c
            .want_log
            .then(|| DeviceRowsMut::new(view_mut(&lp, n), c.b, c.v, os).unwrap()),
        probs: c
            .want_prob
            .then(|| DeviceRowsMut::new(view_mut(&p, n), c.b, c.v, os).unwrap()),
        argmax: Some(view_mut(&am, c.b)),
        log_normalizer: Some(view_mut(&lz, c.b)),
        entropy: want_unc(0).then(|| view_mut(&ub[0], c.b)),
        top1_prob: want_unc(1).then(|| view_mut(&ub[1], c.b)),
        margin: want_unc(2).then(|| view_mut(&ub[2], c.b)),
        disagreement: want_unc(3).then(|| view_mut(&ub[3], c.b)),
    };
    // SAFETY: the stream is live for the call.
    let stream = unsafe { Stream::from_raw(g.stream.as_inner().cast()) };
    let workspace = (version != Version::V1).then(|| view_mut(ws, ws.len()));
    gpu_combine(&g.kernels, &models, &cfg, out, workspace, stream, version)
        .map_err(|e| format!("launch: {e:?}"))?;
    g.stream
        .synchronize()
        .map_err(|e| format!("synchronize: {e:?}"))?;
    let fetch = |buf: &DeviceBuffer<u32>, len: usize| -> Vec<u32> {
        let mut h = vec![0u32; len.max(1)];
        buf.copy_to(&mut h[..]).expect("copy back");
        h.truncate(len);
        h
    };
    let mut o = Outs::default();
    for (want, buf, dst) in [(c.want_log, &lp, &mut o.lp), (c.want_prob, &p, &mut o.p)] {
        if want {
            let padded = fetch(buf, n);
            // Keep the row elements; the padding must stay untouched.
            let mut bits = Vec::with_capacity(c.b * c.v);
            for r in 0..c.b {
                let row = &padded[r * os..(r + 1) * os];
                if let Some(i) = row[..c.v].iter().position(|&x| x == POISON) {
                    return Err(format!("{}: row {r} element {i} was never written", c.name));
                }
                if row[c.v..].iter().any(|&x| x != POISON) {
                    return Err(format!("{}: row {r} padding was written", c.name));
                }
                bits.extend_from_slice(&row[..c.v]);
            }
            *dst = bits.into_iter().map(f32::from_bits).collect();
        }
    }
    o.am = fetch(&am, c.b);
    let lzb = fetch(&lz, c.b);
    if o.am.contains(&POISON) || lzb.contains(&POISON) {
        return Err(format!("{}: per-row output never written", c.name));
    }
    o.lz = lzb.into_iter().map(f32::from_bits).collect();
    for k in (0..4).filter(|&k| want_unc(k)) {
        let bits = fetch(&ub[k], c.b);
        if let Some(r) = bits.iter().position(|&x| x == POISON) {
            return Err(format!("{}: row {r} of {} never written", c.name, UNC[k]));
        }
        o.unc[k] = bits.into_iter().map(f32::from_bits).collect();
    }
    Ok(o)
}

/// The other outputs of a run with the uncertainty outputs must be those of
/// the plain run, bit for bit.
fn same_bits(c: &Case, plain: &Outs, unc: &Outs) -> Result<(), String> {
    let f = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (what, a, b) in [
        ("log_probs", f(&plain.lp), f(&unc.lp)),
        ("probs", f(&plain.p), f(&unc.p)),
        ("log_normalizer", f(&plain.lz), f(&unc.lz)),
        ("argmax", plain.am.clone(), unc.am.clone()),
    ] {
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
            return Err(format!(
                "{}: {what}[{i}] changed when uncertainty outputs are requested ({:#x} vs {:#x})",
                c.name, a[i], b[i]
            ));
        }
    }
    Ok(())
}

/// Compares the GPU's uncertainty outputs with the core's: NaN exactly where
/// the core has NaN, else `|gpu - cpu| <= UNC_TOL * max(1, |cpu|)`. Returns
/// how many values were compared.
fn check_unc(c: &Case, gpu: &Outs, cpu: &Outs) -> Result<usize, String> {
    let mut n = 0;
    for k in 0..4 {
        if gpu.unc[k].len() != cpu.unc[k].len() {
            return Err(format!(
                "{}: {} has {} rows, the core {}",
                c.name,
                UNC[k],
                gpu.unc[k].len(),
                cpu.unc[k].len()
            ));
        }
        for (b, (&g, &w)) in gpu.unc[k].iter().zip(&cpu.unc[k]).enumerate() {
            let ok = if w.is_nan() {
                g.is_nan()
            } else {
                (g - w).abs() <= UNC_TOL * w.abs().max(1.0)
            };
            if !ok {
                return Err(format!("{} row {b}: {} {g} vs the core's {w}", c.name, UNC[k]));
            }
            n += 1;
        }
    }
    Ok(n)
}

fn cases() -> Vec<Case> {
    // MEDLEY_CONFORMANCE_RANDOM=n keeps n random cases of each kind (the
    // compute-sanitizer run uses a small n; the fixed cases always run).
    let n: u64 = std::env::var("MEDLEY_CONFORMANCE_RANDOM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut v: Vec<Case> = (0..n).map(|s| Case::random(0x5EED_0000 + s, 300, 4)).collect();
    v.extend((0..n.min(40)).map(|s| Case::random(0xB16_0000 + s, 5000, 8)));
    for dtype in 0..3u8 {
        for mode in [Mode::Linear, Mode::LogLinear] {
            v.push(Case::dense("M=1 B=1 V=1001", 11, 1, 1, 1001, mode, dtype));
            v.push(Case::dense("M=8 B=3 V=4099", 12, 8, 3, 4099, mode, dtype));
            v.push(Case::dense("M=2 B=2 V=32000", 13, 2, 2, 32000, mode, dtype));
        }
    }
    v.push(Case::dense(
        "M=4 B=1 V=262144 (a 256k row)",
        14,
        4,
        1,
        262_144,
        Mode::LogLinear,
        2,
    ));
    v.push(Case::dense(
        "M=2 B=1 V=256000 linear",
        15,
        2,
        1,
        256_000,
        Mode::Linear,
        2,
    ));
    // Edge values: masked tokens, negative lambda, zero weights, plausibility.
    let mut e = Case::dense(
        "edges: contrastive with plausibility",
        16,
        3,
        4,
        777,
        Mode::LogLinear,
        0,
    );
    e.weights = vec![1.0, -1.0, 0.0];
    e.plaus = Some((0, 0.1));
    for i in (0..e.data[1].len()).step_by(7) {
        e.data[1][i] = f32::NEG_INFINITY;
    }
    e.data[2][5] = f32::NAN; // zero weight: never read
    v.push(e);
    let mut e = Case::dense(
        "edges: linear, masked rows and MaskRule::Any",
        17,
        2,
        3,
        129,
        Mode::Linear,
        2,
    );
    for x in e.data[0][..129].iter_mut() {
        *x = f32::NEG_INFINITY;
    }
    for x in e.data[1][..129].iter_mut() {
        *x = f32::NEG_INFINITY;
    }
    e.mask_rule = MaskRule::Any;
    e.t_out = 0.7;
    v.push(e);
    v.extend(nan_cases());
    v
}

/// Cases with NaN rows (and masked rows) for the uncertainty comparison:
/// both modes, aligned (v2) and odd rows, MaskRule::Any and T_out != 1.
fn nan_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (i, (mode, dtype, vv, any)) in [
        (Mode::Linear, 0u8, 1000usize, false),
        (Mode::Linear, 2, 2048, true),
        (Mode::Linear, 1, 777, false),
        (Mode::LogLinear, 0, 1000, false),
        (Mode::LogLinear, 1, 4096, false),
        (Mode::LogLinear, 2, 333, false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Case::dense(
            &format!("NaN rows: {mode:?} dtype {dtype} V={vv}"),
            40 + i as u64,
            3,
            4,
            vv,
            mode,
            dtype,
        );
        c.nan_rows = true;
        // row 1: a NaN logit of a weighted model; row 2: fully masked
        c.data[0][vv + 17] = f32::NAN;
        for m in 0..3 {
            for x in c.data[m][2 * vv..3 * vv].iter_mut() {
                *x = f32::NEG_INFINITY;
            }
        }
        if any {
            c.mask_rule = MaskRule::Any;
            c.t_out = 0.7;
        }
        v.push(c);
    }
    v
}

/// v2 needs 16-byte aligned rows: strides that are multiples of 16 bytes
/// (device buffers themselves are 256-byte aligned).
fn v2_applies(c: &Case) -> bool {
    let esize = if c.dtype == 0 { 4 } else { 2 };
    c.strides.iter().all(|s| (s * esize) % 16 == 0)
}

#[test]
fn conformance_cpu_and_gpu() {
    let cases = cases();
    let mut failures = Vec::new();
    let cpu: Vec<Outs> = cases.iter().map(run_cpu).collect();
    for (c, o) in cases.iter().zip(&cpu) {
        if c.nan_rows {
            continue;
        }
        if let Err(e) = check(c, o, "cpu") {
            failures.push(e);
        }
    }
    let cpu_fail = failures.len();
    let mut gpu_runs = 0;
    let (mut unc_runs, mut unc_values) = (0, 0);
    if let Some(g) = gpu() {
        // One workspace, zeroed once, reused by every v2 call (the kernel
        // must leave it ready for the next call).
        let (ws, ws_len) = shared_workspace(&g, &cases);
        for k in [medley_cuda::Kernel::EnsembleV2, medley_cuda::Kernel::EnsembleV2U] {
            eprintln!(
                "{:?}: {} regs, {} blocks/SM; workspace {ws_len} bytes",
                k,
                g.kernels.info(k).registers,
                g.kernels.info(k).blocks_per_sm
            );
        }
        // MEDLEY_CONFORMANCE_VERSIONS=v1 (or v2) restricts the versions run.
        let only = std::env::var("MEDLEY_CONFORMANCE_VERSIONS").unwrap_or_default();
        // MEDLEY_CONFORMANCE_TRACE=1 names each case before its GPU runs (the
        // last name printed is the one a sanitizer stopped on).
        let trace = std::env::var_os("MEDLEY_CONFORMANCE_TRACE").is_some();
        let versions: Vec<Version> = [Version::V1, Version::V2]
            .into_iter()
            .filter(|v| only.is_empty() || only.contains(&format!("{v:?}").to_lowercase()))
            .collect();
        for version in versions {
            for (c, cpu_o) in cases.iter().zip(&cpu) {
                if version == Version::V2 && !v2_applies(c) {
                    continue;
                }
                if trace {
                    eprintln!(
                        "trace: {version:?} {}: M {} B {} V {} vms {:?} dtype {} {:?} {:?} t_out {} plaus {:?} per_row {}",
                        c.name,
                        c.m(),
                        c.b,
                        c.v,
                        c.vms,
                        c.dtype,
                        c.mode,
                        c.mask_rule,
                        c.t_out,
                        c.plaus,
                        c.per_row
                    );
                }
                gpu_runs += 1;
                let plain = match run_gpu(&g, c, version, &ws, false) {
                    Ok(o) => o,
                    Err(e) => {
                        failures.push(format!("gpu {version:?}: {e}"));
                        continue;
                    }
                };
                if !c.nan_rows
                    && let Err(e) = check(c, &plain, &format!("gpu {version:?}"))
                {
                    failures.push(e);
                }
                // Again with the uncertainty outputs.
                gpu_runs += 1;
                unc_runs += 1;
                let r = run_gpu(&g, c, version, &ws, true).and_then(|u| {
                    same_bits(c, &plain, &u)?;
                    if plaus_on_cut(c, &ref_models(c)) {
                        return Ok(0); // the backends may cut differently
                    }
                    check_unc(c, &u, cpu_o)
                });
                match r {
                    Ok(n) => unc_values += n,
                    Err(e) => failures.push(format!("gpu {version:?} uncertainty: {e}")),
                }
            }
        }
    }
    eprintln!(
        "conformance: {} cases on the CPU core ({} failed); {} GPU runs ({} failed)",
        cases.len(),
        cpu_fail,
        gpu_runs,
        failures.len() - cpu_fail
    );
    eprintln!(
        "uncertainty: {unc_runs} GPU runs with entropy/top1/margin/disagreement, {unc_values} values compared with the core"
    );
    for f in failures.iter().take(20) {
        eprintln!("  {f}");
    }
    assert!(failures.is_empty(), "{} conformance failures", failures.len());
}

/// Per-row weights live on the device, so the host cannot check them: the
/// kernels turn an invalid row of weights (NaN, infinite, negative in linear
/// mode, all zero in linear mode) into a NaN row, and leave the other rows
/// exact. GPU only (the CPU function rejects such tables with an error).
#[test]
fn device_per_row_weights_are_checked_on_the_device() {
    let Some(g) = medley_cuda::owned::Gpu::open_or_skip("device_per_row_weights") else {
        return;
    };
    use medley_cuda::owned::Buffer;
    let (b, v, m) = (5usize, 64usize, 2usize);
    let mut rng = Gen(77);
    let logits: Vec<f32> = (0..m * b * v).map(|_| rng.range(-4.0, 4.0) as f32).collect();
    let d = Buffer::from_slice(&logits).unwrap();
    for linear in [true, false] {
        // rows: valid, NaN, -1 (invalid only in linear mode), all zero, inf
        let w: Vec<f32> = vec![0.5, 1.0, f32::NAN, 1.0, -1.0, 2.0, 0.0, 0.0, f32::INFINITY, 1.0];
        let dw = Buffer::from_slice(&w).unwrap();
        for version in [Version::V1, Version::V2] {
            let os = 64;
            let lp = Buffer::filled(b * os, POISON).unwrap();
            let am = Buffer::filled(b, POISON).unwrap();
            let ws = Buffer::zeroed(1 << 20).unwrap();
            let models: Vec<DeviceModel<'_>> = (0..m)
                .map(|i| {
                    // SAFETY: model i's b * v logits lie inside `d`, alive for the call.
                    let slice = unsafe { DeviceSlice::from_raw(d.as_raw() + (i * b * v * 4) as u64, b * v) };
                    DeviceModel {
                        logits: DeviceLogits::F32(DeviceRows::dense(slice, b, v).unwrap()),
                        temperature: 1.0,
                    }
                })
                .collect();
            let cfg = DeviceConfig::new(
                if linear { Mode::Linear } else { Mode::LogLinear },
                DeviceWeights::PerRow(DeviceRows::dense(dw.view(b * m), b, m).unwrap()),
            );
            let out = DeviceOutput {
                log_probs: Some(DeviceRowsMut::new(lp.view_mut(b * os), b, v, os).unwrap()),
                argmax: Some(am.view_mut(b)),
                ..Default::default()
            };
            let wsv = (version == Version::V2).then(|| ws.view_mut::<u8>(ws.len()));
            gpu_combine(g.kernels(), &models, &cfg, out, wsv, g.stream(), version).unwrap();
            g.synchronize().unwrap();
            let lpv: Vec<f32> = lp.to_vec(b * os).unwrap();
            let amv: Vec<u32> = am.to_vec(b).unwrap();
            let nan_row = |r: usize| lpv[r * os..r * os + v].iter().all(|x| x.is_nan()) && amv[r] == NO_TOKEN;
            assert!(!nan_row(0), "{linear} {version:?}: the valid row");
            assert!(lpv[..v].iter().all(|x| x.is_finite()));
            assert!(nan_row(1), "{linear} {version:?}: NaN weight");
            assert_eq!(nan_row(2), linear, "{linear} {version:?}: negative weight");
            assert_eq!(nan_row(3), linear, "{linear} {version:?}: all-zero weights");
            assert!(nan_row(4), "{linear} {version:?}: infinite weight");
        }
    }
    eprintln!("device per-row weight checks: v1 and v2, both modes, pass");
}

// ---------------------------------------------------------------------------
// Sampling from the combination: `ensemble_sample` against the core's
// `combine_sample` on every case of the suite.

/// The sampling configurations every case runs with.
fn sampling_configs(seed: u64) -> Vec<Sampling> {
    let mut v = vec![Sampling::greedy(), Sampling::new(1.0, seed)];
    let mut s = Sampling::new(0.7, seed ^ 1);
    s.top_k = 5;
    v.push(s);
    let mut s = Sampling::new(1.3, seed ^ 2);
    s.top_p = 0.9;
    v.push(s);
    let mut s = Sampling::new(1.0, seed ^ 3);
    s.min_p = 0.1;
    v.push(s);
    let mut s = Sampling::new(0.9, seed ^ 4);
    s.top_k = 40;
    s.top_p = 0.8;
    s.min_p = 0.02;
    s.step = 17;
    v.push(s);
    // a cold temperature with min-p (ensemble_v2s's pruning bound is tight)
    let mut s = Sampling::new(0.25, seed ^ 5);
    s.min_p = 0.3;
    s.step = 3;
    v.push(s);
    v
}

/// The CPU's kept set for a row of combined log-probabilities, by sorting
/// (the definition in `medley_core::sample`), and the perturbed scores.
fn cpu_kept_and_y(row: &[f32], s: &Sampling, b: usize) -> (Vec<bool>, Vec<f32>, f32) {
    let r = s.resolve().unwrap();
    let mut cand: Vec<f32> = row.iter().copied().filter(|x| x.is_finite()).collect();
    cand.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let l_max = cand[0];
    let mut t = f32::NEG_INFINITY;
    if r.min_p_shift > f32::NEG_INFINITY {
        t = t.max(l_max + r.min_p_shift);
    }
    if s.top_k > 0 && (s.top_k as usize) < cand.len() {
        t = t.max(cand[s.top_k as usize - 1]);
    }
    if s.top_p < 1.0 {
        let w = |x: f32| (((x - l_max) * r.inv_t) as f64).exp();
        let k1: Vec<f32> = cand.iter().copied().filter(|&x| x >= t).collect();
        let z1: f64 = k1.iter().map(|&x| w(x)).sum();
        let mut cum = 0.0;
        for &x in &k1 {
            cum += w(x);
            if cum >= s.top_p as f64 * z1 {
                t = t.max(x);
                break;
            }
        }
    }
    let y = row
        .iter()
        .enumerate()
        .map(|(v, &x)| {
            x * r.inv_t
                + medley_core::sample::gumbel(medley_core::rng::word(s.seed, [b as u32, s.step], v as u64))
        })
        .collect();
    (row.iter().map(|&x| x.is_finite() && x >= t).collect(), y, t)
}

/// One GPU sampling run of `c` with `s`: tokens and log-probabilities
/// (outputs poisoned first).
/// One zeroed workspace large enough for every case's split-row calls
/// (`ensemble_v2`, `ensemble_v2u`, `ensemble_v2s` share it), and its length.
fn shared_workspace(g: &Gpu, cases: &[Case]) -> (DeviceBuffer<u8>, usize) {
    let len = cases
        .iter()
        .map(|c| {
            let esize = if c.dtype == 0 { 4 } else { 2 };
            medley_cuda::ensemble::workspace_bytes(&g.kernels, c.b, c.v, c.m(), esize).unwrap()
        })
        .max()
        .unwrap_or(0);
    (
        DeviceBuffer::from_slice(&vec![0u8; len.max(16)]).expect("workspace"),
        len,
    )
}

/// Tokens and log-probabilities of one GPU sampling call.
type GpuSample = (Vec<u32>, Vec<f32>);

/// One GPU sampling call: `Ok(None)` when `version` is `V2` and
/// `ensemble_v2s` does not apply to this case (unaligned rows, rows the
/// grid cannot split).
fn run_gpu_sample(
    g: &Gpu,
    c: &Case,
    s: &Sampling,
    version: Version,
    ws: &DeviceBuffer<u8>,
) -> Result<Option<GpuSample>, String> {
    let mut dev16: Vec<DeviceBuffer<u16>> = Vec::new();
    let mut dev32: Vec<DeviceBuffer<f32>> = Vec::new();
    for d in &c.data {
        match c.dtype {
            1 => dev16.push(
                DeviceBuffer::from_slice(&d.iter().map(|&x| f16::from_f32(x).to_bits()).collect::<Vec<_>>())
                    .unwrap(),
            ),
            2 => dev16.push(
                DeviceBuffer::from_slice(&d.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<_>>())
                    .unwrap(),
            ),
            _ => dev32.push(DeviceBuffer::from_slice(d).unwrap()),
        }
    }
    let models: Vec<DeviceModel<'_>> = (0..c.m())
        .map(|i| {
            let (rows, len, stride) = (c.b, c.vms[i], c.strides[i]);
            let n = c.data[i].len();
            let logits = match c.dtype {
                1 => DeviceLogits::F16(DeviceRows::new(view(&dev16[i], n), rows, len, stride).unwrap()),
                2 => DeviceLogits::BF16(DeviceRows::new(view(&dev16[i], n), rows, len, stride).unwrap()),
                _ => DeviceLogits::F32(DeviceRows::new(view(&dev32[i], n), rows, len, stride).unwrap()),
            };
            DeviceModel {
                logits,
                temperature: c.temps[i],
            }
        })
        .collect();
    let wt = DeviceBuffer::from_slice(&c.weights).unwrap();
    let weights = if c.per_row {
        DeviceWeights::PerRow(DeviceRows::dense(view(&wt, c.weights.len()), c.b, c.m()).unwrap())
    } else {
        DeviceWeights::PerModel(&c.weights)
    };
    let mut cfg = DeviceConfig::new(c.mode, weights);
    cfg.out_temperature = c.t_out;
    cfg.plausibility = c.plaus.map(|(model, alpha)| Plausibility { model, alpha });
    cfg.mask_rule = c.mask_rule;
    let tok = poisoned(c.b);
    let lp = poisoned(c.b);
    // SAFETY: the stream is live for the call.
    let stream = unsafe { Stream::from_raw(g.stream.as_inner().cast()) };
    let mut call = medley_cuda::ensemble::Sample::new(&models, &cfg, s, c.v, view_mut(&tok, c.b))
        .with_log_probs(view_mut(&lp, c.b))
        .with_version(version);
    if version != Version::V1 {
        call = call.with_workspace(view_mut(ws, ws.len()));
    }
    match call.launch(&g.kernels, stream) {
        Ok(()) => {}
        Err(
            CudaError::Misaligned { .. }
            | CudaError::Unsupported { .. }
            | CudaError::Invalid(Error::Unsupported { .. }),
        ) if version == Version::V2 => {
            return Ok(None);
        }
        Err(e) => return Err(format!("{}: launch: {e:?}", c.name)),
    }
    g.stream
        .synchronize()
        .map_err(|e| format!("{}: synchronize: {e:?}", c.name))?;
    let fetch = |buf: &DeviceBuffer<u32>| -> Vec<u32> {
        let mut h = vec![0u32; c.b.max(1)];
        buf.copy_to(&mut h[..]).expect("copy back");
        h.truncate(c.b);
        h
    };
    let (t, l) = (fetch(&tok), fetch(&lp));
    if t.contains(&POISON) || l.contains(&POISON) {
        return Err(format!(
            "{}: a token or log-probability was never written",
            c.name
        ));
    }
    Ok(Some((t, l.into_iter().map(f32::from_bits).collect())))
}

/// The CPU half of a sampling comparison: tokens, log-probabilities and
/// the combined rows (for explaining a disagreement).
fn run_cpu_sample(c: &Case, s: &Sampling) -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let f16s: Vec<Vec<f16>> = c
        .data
        .iter()
        .map(|r| r.iter().map(|&x| f16::from_f32(x)).collect())
        .collect();
    let bf16s: Vec<Vec<bf16>> = c
        .data
        .iter()
        .map(|r| r.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let models: Vec<Model<'_>> = (0..c.m())
        .map(|i| {
            let logits: Logits<'_> = match c.dtype {
                1 => Rows::new(&f16s[i][..], c.b, c.vms[i], c.strides[i])
                    .unwrap()
                    .into(),
                2 => Rows::new(&bf16s[i][..], c.b, c.vms[i], c.strides[i])
                    .unwrap()
                    .into(),
                _ => Rows::new(&c.data[i][..], c.b, c.vms[i], c.strides[i])
                    .unwrap()
                    .into(),
            };
            Model {
                logits,
                temperature: c.temps[i],
            }
        })
        .collect();
    let (mut t, mut l) = (vec![0u32; c.b], vec![0f32; c.b]);
    let mut scratch = vec![0f32; c.v];
    combine_sample(
        &models,
        &c.config(),
        s,
        c.v,
        &mut scratch,
        Sampled {
            tokens: &mut t,
            log_probs: Some(&mut l),
        },
    )
    .expect("valid case");
    let mut rows = vec![0f32; c.b * c.v];
    combine(
        &models,
        &c.config(),
        Output {
            log_probs: Some(RowsMut::dense(&mut rows, c.b, c.v).unwrap()),
            ..Default::default()
        },
    )
    .expect("valid case");
    (t, l, rows)
}

/// Tolerance of the rounding-level differences a disagreement may come
/// from (combined log-probabilities and Gumbel values, CPU vs GPU).
const SAMPLE_TIE: f32 = 1e-4;

#[test]
fn sampling_cpu_and_gpu_pick_the_same_token() {
    let cases = cases();
    let Some(g) = gpu() else {
        return;
    };
    let (mut runs, mut rows, mut ties, mut failures) = (0usize, 0usize, Vec::new(), Vec::new());
    // MEDLEY_SAMPLE_MAX_ROW=n skips cases whose rows are longer than n
    // logits over all models (the racecheck run: its shared-memory
    // tracking makes the 256k-token rows take minutes); the count is
    // printed.
    let max_row: usize = std::env::var("MEDLEY_SAMPLE_MAX_ROW")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    let mut skipped = 0usize;
    // One workspace, zeroed once, for every ensemble_v2s call (each must
    // leave it ready for the next, whatever the shape).
    let (ws, _) = shared_workspace(&g, &cases);
    let (mut v1_runs, mut v2_runs) = (0usize, 0usize);
    for (ci, c) in cases.iter().enumerate() {
        if c.data.len() * c.v > max_row {
            skipped += 1;
            continue;
        }
        for (s, version) in sampling_configs(0xC0FFEE + ci as u64)
            .into_iter()
            .flat_map(|s| [(s, Version::V1), (s, Version::V2)])
        {
            let (ct, cl, lp) = run_cpu_sample(c, &s);
            let (gt, gl) = match run_gpu_sample(&g, c, &s, version, &ws) {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            runs += 1;
            match version {
                Version::V1 => v1_runs += 1,
                _ => v2_runs += 1,
            }
            for b in 0..c.b {
                rows += 1;
                let what = format!("{} row {b} {version:?} {s:?}", c.name);
                if ct[b] == gt[b] {
                    let (x, y) = (cl[b], gl[b]);
                    let same_class = (x.is_nan() && y.is_nan())
                        || (x == y)
                        || (x - y).abs() <= SAMPLE_TIE * (1.0 + x.abs());
                    if !same_class {
                        failures.push(format!("{what}: log-prob cpu {x} gpu {y}"));
                    }
                    continue;
                }
                // A different token must come from a rounding tie: of the
                // perturbed scores, or at the kept set's cut.
                let row = &lp[b * c.v..(b + 1) * c.v];
                if ct[b] == NO_TOKEN || gt[b] == NO_TOKEN || gt[b] as usize >= c.v {
                    failures.push(format!("{what}: token cpu {} gpu {}", ct[b], gt[b]));
                    continue;
                }
                let (kept, yv, t) = cpu_kept_and_y(row, &s, b);
                let (a, o) = (ct[b] as usize, gt[b] as usize);
                let y_tie = (yv[a] - yv[o]).abs() <= SAMPLE_TIE * (1.0 + yv[a].abs());
                let greedy_tie =
                    s.temperature == 0.0 && (row[a] - row[o]).abs() <= SAMPLE_TIE * (1.0 + row[a].abs());
                // the GPU kept a token the CPU cut (or cut the CPU's) at the threshold
                let cut_tie = (!kept[o] && (row[o] - t).abs() <= SAMPLE_TIE * (1.0 + t.abs()))
                    || (kept[a] && (row[a] - t).abs() <= SAMPLE_TIE * (1.0 + t.abs()));
                if (y_tie && kept[o]) || greedy_tie || cut_tie {
                    ties.push(what);
                } else {
                    failures.push(format!(
                        "{what}: token cpu {a} (L {}, y {}) gpu {o} (L {}, y {}, kept by the cpu: {}), cut {t}",
                        row[a], yv[a], row[o], yv[o], kept[o]
                    ));
                }
            }
        }
    }
    eprintln!(
        "sampling: {runs} GPU runs ({} cases x 7 configurations: {v1_runs} ensemble_sample, {v2_runs} ensemble_v2s; {skipped} cases skipped by MEDLEY_SAMPLE_MAX_ROW), {rows} rows; {} tokens differ at a rounding tie, {} failures",
        cases.len() - skipped,
        ties.len(),
        failures.len()
    );
    for t in ties.iter().take(10) {
        eprintln!("  tie: {t}");
    }
    for f in failures.iter().take(20) {
        eprintln!("  {f}");
    }
    assert!(runs > 0, "MEDLEY_SAMPLE_MAX_ROW={max_row} skipped every case");
    // ensemble_v2s ran (every configuration, on aligned rows; on the full
    // suite for at least a quarter of the calls)
    assert!(v2_runs > 0, "ensemble_v2s never ran");
    if skipped == 0 {
        assert!(
            v2_runs * 4 >= v1_runs,
            "ensemble_v2s ran {v2_runs} times, ensemble_sample {v1_runs}"
        );
    }
    assert!(failures.is_empty(), "{} sampling failures", failures.len());
    // ties are rare: at most 1 in 1000 rows
    assert!(
        ties.len() * 1000 <= rows.max(1000),
        "{} ties in {rows} rows",
        ties.len()
    );
}
