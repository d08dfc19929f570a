//! Drives the merge entry points with arbitrary shapes, parameters (valid
//! and not) and raw bit patterns (NaN, ±inf, huge, tiny, subnormal).
//! Asserts: no panic; an error leaves the output untouched; the two-phase
//! form with arbitrary chunk boundaries writes exactly the one-shot bits
//! (NaN payloads aside);
//! top-k keeps exactly k elements; element-wise merges of finite inputs
//! with finite weights are finite or flagged overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medley_core::merge::gta::{
    Consensus, Divisor, Gta, GtaOptions, Rescale, Sparsify, TaskParams, Votes, merge,
};
use medley_core::merge::linear::{add_task_vectors, average, linear, task_vector};
use medley_core::merge::sce::{SceOptions, sce};
use medley_core::merge::select::{TopK, top_k};
use medley_core::merge::sphere::{
    KarcherOptions, Layout, MultislerpOptions, NuslerpOptions, SlerpOptions, karcher, multislerp, nuslerp,
    slerp,
};
use medley_core::merge::stock::{StockOptions, model_stock};
use medley_core::{bf16, f16};

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
    /// Mostly sane values, sometimes raw bit patterns.
    fn f32(&mut self) -> f32 {
        match self.u8() % 10 {
            0 => f32::from_bits(self.u32()),
            1 => 0.0,
            2 => (self.u8() % 4) as f32 - 2.0,
            _ => (self.u8() as i8) as f32 / 64.0,
        }
    }
    fn frac(&mut self) -> f64 {
        match self.u8() % 12 {
            0 => f64::NAN,
            1 => 0.0,
            2 => 1.5,
            3 => 1.0,
            _ => (self.u8() as f64 + 1.0) / 257.0,
        }
    }
    fn weight(&mut self) -> f32 {
        match self.u8() % 12 {
            0 => f32::from_bits(self.u32()),
            1 => 0.0,
            2 => -1.0,
            _ => (self.u8() as f32 + 1.0) / 64.0,
        }
    }
}

const SENTINEL: f32 = 12345.0;

/// Bits, with every NaN mapped to one pattern: NaN payloads may differ
/// between chunkings (LLVM may swap the operands of a commutative `+` when
/// both are NaN in vectorized code but not in a scalar remainder).
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() }).collect()
}

fuzz_target!(|data: &[u8]| {
    let mut r = Bytes(data);
    let m = 1 + (r.u8() % 4) as usize;
    let row_len = 1 + (r.u8() % 16) as usize;
    let rows = (r.u8() % 24) as usize;
    let n = rows * row_len;
    let base: Vec<f32> = (0..n).map(|_| r.f32()).collect();
    let models: Vec<Vec<f32>> = (0..m).map(|_| (0..n).map(|_| r.f32()).collect()).collect();
    let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
    let weights: Vec<f32> = (0..m).map(|_| r.weight()).collect();

    // Top-k: exactly k kept.
    if n > 0 {
        let k = (r.u8() as usize) % (n + 1);
        let t = top_k(&base, k).unwrap();
        assert_eq!((0..n).filter(|&i| t.keeps(i as u64, base[i])).count(), k);
        let mut sel = TopK::with_strategy(n as u64, k as u64, r.u8() % 2 == 0).unwrap();
        let mut work = vec![0u32; sel.work_len()];
        while !sel.is_done() {
            sel.feed(&base, &mut work).unwrap();
            sel.end_pass(&mut work).unwrap();
        }
        let t2 = sel.threshold().unwrap();
        for i in 0..n {
            assert_eq!(t.keeps(i as u64, base[i]), t2.keeps(i as u64, base[i]));
        }
    }

    // Linear family: errors leave out untouched; halves agree with f32.
    let mut out = vec![SENTINEL; n];
    let normalize = r.u8() % 2 == 0;
    match linear(&views, &weights, normalize, &mut out) {
        Err(_) => assert!(out.iter().all(|&x| x == SENTINEL)),
        Ok(()) => {
            let h: Vec<Vec<bf16>> = models.iter().map(|x| x.iter().map(|&v| bf16::from_f32(v)).collect()).collect();
            let hv: Vec<&[bf16]> = h.iter().map(|x| &x[..]).collect();
            let mut o16 = vec![f16::ZERO; n];
            linear(&hv, &weights, normalize, &mut o16).unwrap();
        }
    }
    let mut out = vec![SENTINEL; n];
    let _ = average(&views, &mut out);
    let mut out = vec![SENTINEL; n];
    if task_vector(&models[0], &base, &mut out).is_err() {
        assert!(out.iter().all(|&x| x == SENTINEL));
    }
    let lambda = r.weight();
    let mut out = vec![SENTINEL; n];
    if add_task_vectors(&base, &views, &weights, lambda, &mut out).is_err() {
        assert!(out.iter().all(|&x| x == SENTINEL));
    }

    // GTA: one-shot vs arbitrary chunking, bit for bit.
    let sp = [Sparsify::None, Sparsify::Magnitude, Sparsify::Random, Sparsify::Outliers, Sparsify::Della]
        [(r.u8() % 5) as usize];
    let opts = GtaOptions {
        sparsify: sp,
        row_len: if r.u8() % 2 == 0 { Some(row_len) } else { None },
        consensus: [Consensus::None, Consensus::Sum, Consensus::Count][(r.u8() % 3) as usize],
        votes: if r.u8() % 2 == 0 { Votes::Weighted } else { Votes::Unweighted },
        divisor: if r.u8() % 2 == 0 { Divisor::WeightSum } else { Divisor::Count },
        normalize: r.u8() % 2 == 0,
        rescale: [Rescale::None, Rescale::L1, Rescale::L2, Rescale::Linf, Rescale::InverseKeep][(r.u8() % 5) as usize],
        lambda: if r.u8() % 4 == 0 { r.weight() } else { 1.0 },
        seed: r.u32() as u64,
        tensor_id: r.u32(),
    };
    let params: Vec<TaskParams> = (0..m)
        .map(|i| TaskParams { weight: weights[i], density: r.frac(), gamma: r.frac() * 0.5, epsilon: r.frac() * 0.3 })
        .collect();
    let mut out = vec![SENTINEL; n];
    let plan = Gta::new(n, &params, &opts);
    let mut scratch = vec![0u32; plan.as_ref().map_or(0, |p| p.scratch_len())];
    match merge(&views, &base, &params, &opts, &mut scratch, &mut out) {
        Err(_) => assert!(out.iter().all(|&x| x == SENTINEL)),
        Ok(()) => {
            let plan = plan.unwrap();
            let unit = if matches!(sp, Sparsify::Della) || (matches!(sp, Sparsify::Magnitude | Sparsify::Outliers) && opts.row_len.is_some()) {
                opts.row_len.unwrap_or(n).max(1)
            } else {
                1
            };
            let nrows = n / unit;
            let mut cuts: Vec<usize> = (0..(r.u8() % 5)).map(|_| (r.u8() as usize % (nrows + 1)) * unit).collect();
            cuts.push(0);
            cuts.push(n);
            cuts.sort();
            let mut st = plan.stats(&mut scratch).unwrap();
            while st.needs_pass() {
                for w in cuts.windows(2) {
                    let v: Vec<&[f32]> = models.iter().map(|x| &x[w[0]..w[1]]).collect();
                    st.feed(&v, &base[w[0]..w[1]]).unwrap();
                }
                st.end_pass().unwrap();
            }
            let ready = st.finish().unwrap();
            let mut ch = vec![SENTINEL; n];
            for w in cuts.windows(2).rev() {
                let v: Vec<&[f32]> = models.iter().map(|x| &x[w[0]..w[1]]).collect();
                ready.apply(&v, &base[w[0]..w[1]], w[0], &mut scratch, &mut ch[w[0]..w[1]]).unwrap();
            }
            assert_eq!(bits(&ch), bits(&out));
        }
    }

    // Spherical methods, Model Stock, SCE: no panic, errors write nothing.
    let t = r.weight();
    let mut out = vec![SENTINEL; n];
    if slerp(&base, &models[0], &SlerpOptions::new(t), &mut out).is_err() {
        assert!(out.iter().all(|&x| x == SENTINEL));
    }
    if m >= 2 {
        let layout = [Layout::Flat, Layout::Rows(row_len), Layout::Columns(row_len)][(r.u8() % 3) as usize];
        let o = NuslerpOptions { layout, ..NuslerpOptions::new() };
        let mut s = vec![0.0f64; 3 * row_len];
        let mut out = vec![SENTINEL; n];
        let b = if r.u8() % 2 == 0 { Some(&base[..]) } else { None };
        if nuslerp(&models[0], &models[1], b, [weights[0], weights[1]], &o, &mut s, &mut out).is_err() {
            assert!(out.iter().all(|&x| x == SENTINEL));
        }
        let mut out = vec![SENTINEL; n];
        if model_stock(&views, &base, &StockOptions { rows: (r.u8() % 2 == 0).then_some(row_len) }, &mut out).is_err() {
            assert!(out.iter().all(|&x| x == SENTINEL));
        }
    }
    let mut out = vec![SENTINEL; n];
    let b = if r.u8() % 2 == 0 { Some(&base[..]) } else { None };
    if multislerp(&views, b, &weights, &MultislerpOptions::new(), &mut out).is_err() {
        assert!(out.iter().all(|&x| x == SENTINEL));
    }
    let mut out = vec![SENTINEL; n];
    if karcher(&views, &weights, &KarcherOptions::new(), &mut out).is_err() {
        assert!(out.iter().all(|&x| x == SENTINEL));
    }
    let mut out = vec![SENTINEL; n];
    let mut s = vec![0u32; 4096];
    if sce(&views, &base, &SceOptions { select_topk: r.frac() }, &mut s, &mut out).is_err() {
        assert!(out.iter().all(|&x| x == SENTINEL));
    }
});
