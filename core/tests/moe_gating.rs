#![allow(clippy::needless_range_loop)]
//! Gating against full-sort / f64 references, plus fixed cases for ties,
//! E not a power of two, k = E, T = 0, T = 1, non-finite rows and errors.

mod moe_util;

use medley_core::math::act::sigmoid;
use medley_core::moe::gating::{
    GroupScore, GroupedConfig, Noise, Scoring, grouped_topk, keep_topk_softmax, noisy_logit, noisy_topk,
    topk_softmax,
};
use medley_core::moe::{MAX_EXPERTS, MAX_K};
use medley_core::{Error, Rows, bf16, f16, rng};
use moe_util::{Dt, Gen, close, ref_topk, softmax64};
use proptest::prelude::*;

/// A random router batch: T rows of E logits (stride >= E), already rounded
/// through the element type the call will read.
#[derive(Debug, Clone)]
struct Case {
    t: usize,
    e: usize,
    k: usize,
    stride: usize,
    dt: Dt,
    data: Vec<f32>,
}

impl Case {
    fn make(seed: u64, p_mask: f64) -> Case {
        let mut g = Gen(seed);
        let t = g.below(5);
        let e = match g.below(4) {
            0 => 1 + g.below(8),
            1 => 1 + g.below(64),
            2 => [5, 6, 60, 96, 128, 144, 160, 256, 384][g.below(9)],
            _ => 1 + g.below(400),
        };
        let k = 1 + g.below(e.min(MAX_K));
        let stride = e + g.below(3);
        let dt = Dt::pick(&mut g);
        let mask = if g.chance(0.3) { p_mask } else { 0.0 };
        let tie = g.unit();
        let data = (0..t * stride)
            .map(|_| dt.round(g.logit(6.0, tie, mask)))
            .collect();
        Case {
            t,
            e,
            k,
            stride,
            dt,
            data,
        }
    }
    fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.stride..t * self.stride + self.e]
    }
}

/// Calls `$f(rows)` with the case's data as its element type.
macro_rules! with_rows {
    ($c:expr, |$r:ident| $body:expr) => {{
        let c = &$c;
        match c.dt {
            Dt::F32 => {
                let $r = Rows::new(&c.data[..], c.t, c.e, c.stride).unwrap();
                $body
            }
            Dt::F16 => {
                let v: Vec<f16> = c.data.iter().map(|&x| f16::from_f32(x)).collect();
                let $r = Rows::new(&v[..], c.t, c.e, c.stride).unwrap();
                $body
            }
            Dt::Bf16 => {
                let v: Vec<bf16> = c.data.iter().map(|&x| bf16::from_f32(x)).collect();
                let $r = Rows::new(&v[..], c.t, c.e, c.stride).unwrap();
                $body
            }
        }
    }};
}

fn masked(row: &[f32]) -> bool {
    row.iter().all(|&x| x == f32::NEG_INFINITY)
}

fn first_k(k: usize) -> Vec<u32> {
    (0..k as u32).collect()
}

/// Relative closeness for probabilities (which flush below 2^-126).
#[track_caller]
fn prob_close(a: f32, b: f64, what: &str) {
    assert!(
        (a as f64 - b).abs() <= 1e-5 * b + 2e-38,
        "{what}: got {a}, want {b}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn topk_softmax_matches_reference(seed in any::<u64>(), renorm in any::<bool>()) {
        let c = Case::make(seed, 0.3);
        let (t, k) = (c.t, c.k);
        let mut ids = vec![u32::MAX; t * k];
        let mut w = vec![f32::NAN; t * k];
        let rep = with_rows!(c, |r| topk_softmax(r, k, renorm, &mut ids, &mut w)).unwrap();
        let mut n_masked = 0;
        for tok in 0..t {
            let row = c.row(tok);
            let (id, wt) = (&ids[tok * k..(tok + 1) * k], &w[tok * k..(tok + 1) * k]);
            if masked(row) {
                n_masked += 1;
                prop_assert_eq!(id, &first_k(k)[..]);
                prop_assert!(wt.iter().all(|&x| x == 0.0));
                continue;
            }
            prop_assert_eq!(id, &ref_topk(row, k, |_| true)[..]);
            let p = softmax64(row);
            let mut want: Vec<f64> = id.iter().map(|&e| p[e as usize]).collect();
            if renorm {
                let s: f64 = want.iter().sum();
                want.iter_mut().for_each(|x| *x /= s);
                let total: f64 = wt.iter().map(|&x| x as f64).sum();
                prop_assert!((total - 1.0).abs() < 2e-6, "renormalized sum {}", total);
            }
            for j in 0..k {
                prob_close(wt[j], want[j], "weight");
            }
            // Descending weights follow descending logits.
            for j in 1..k {
                prop_assert!(wt[j] <= wt[j - 1]);
            }
        }
        prop_assert_eq!(rep.masked_rows, n_masked);
        prop_assert_eq!(rep.nan_rows, 0);
    }

    #[test]
    fn keep_topk_softmax_is_softmax_over_kept(seed in any::<u64>()) {
        let c = Case::make(seed, 0.3);
        let (t, k) = (c.t, c.k);
        let mut ids = vec![u32::MAX; t * k];
        let mut w = vec![f32::NAN; t * k];
        let rep = with_rows!(c, |r| keep_topk_softmax(r, k, &mut ids, &mut w)).unwrap();
        let mut n_masked = 0;
        for tok in 0..t {
            let row = c.row(tok);
            let (id, wt) = (&ids[tok * k..(tok + 1) * k], &w[tok * k..(tok + 1) * k]);
            if masked(row) {
                n_masked += 1;
                prop_assert!(wt.iter().all(|&x| x == 0.0));
                continue;
            }
            prop_assert_eq!(id, &ref_topk(row, k, |_| true)[..]);
            let kept: Vec<f32> = id.iter().map(|&e| row[e as usize]).collect();
            let want = softmax64(&kept);
            let total: f64 = wt.iter().map(|&x| x as f64).sum();
            prop_assert!((total - 1.0).abs() < 2e-6);
            for j in 0..k {
                prob_close(wt[j], want[j], "kept weight");
            }
        }
        prop_assert_eq!(rep.masked_rows, n_masked);
    }

    #[test]
    fn noisy_topk_matches_reference_and_is_chunk_invariant(seed in any::<u64>(), nseed in any::<u64>()) {
        let c = Case::make(seed, 0.1);
        let (t, e, k) = (c.t, c.e, c.k);
        let mut g = Gen(seed ^ 0x5555);
        let nl: Vec<f32> = (0..t * c.stride).map(|_| c.dt.round(g.range(-6.0, 2.0) as f32)).collect();
        let noise = Noise { seed: nseed, layer: g.below(100) as u32, token_offset: g.below(1000) as u64 };
        let nc = Case { data: nl.clone(), ..c.clone() };
        let mut ids = vec![0u32; t * k];
        let mut w = vec![0.0f32; t * k];
        let rep = match c.dt {
            Dt::F32 => noisy_topk(
                Rows::new(&c.data[..], t, e, c.stride).unwrap(),
                Rows::new(&nl[..], t, e, c.stride).unwrap(), k, noise, &mut ids, &mut w),
            Dt::F16 => {
                let a: Vec<f16> = c.data.iter().map(|&x| f16::from_f32(x)).collect();
                let b: Vec<f16> = nl.iter().map(|&x| f16::from_f32(x)).collect();
                noisy_topk(Rows::new(&a[..], t, e, c.stride).unwrap(),
                    Rows::new(&b[..], t, e, c.stride).unwrap(), k, noise, &mut ids, &mut w)
            }
            Dt::Bf16 => {
                let a: Vec<bf16> = c.data.iter().map(|&x| bf16::from_f32(x)).collect();
                let b: Vec<bf16> = nl.iter().map(|&x| bf16::from_f32(x)).collect();
                noisy_topk(Rows::new(&a[..], t, e, c.stride).unwrap(),
                    Rows::new(&b[..], t, e, c.stride).unwrap(), k, noise, &mut ids, &mut w)
            }
        }.unwrap();
        let mut n_masked = 0;
        for tok in 0..t {
            // The documented noise rule, spelled out.
            let h: Vec<f32> = (0..e).map(|i| {
                let z = rng::normal(noise.seed, [noise.layer, 0], (noise.token_offset + tok as u64) * e as u64 + i as u64);
                assert_eq!(z.to_bits(), noise.sample(e, tok, i).to_bits());
                noisy_logit(c.row(tok)[i], nc.row(tok)[i], z)
            }).collect();
            let (id, wt) = (&ids[tok * k..(tok + 1) * k], &w[tok * k..(tok + 1) * k]);
            if masked(&h) {
                n_masked += 1;
                continue;
            }
            prop_assert_eq!(id, &ref_topk(&h, k, |_| true)[..]);
            let kept: Vec<f32> = id.iter().map(|&i| h[i as usize]).collect();
            let want = softmax64(&kept);
            for j in 0..k {
                prob_close(wt[j], want[j], "noisy weight");
            }
        }
        prop_assert_eq!(rep.masked_rows, n_masked);
        // Two chunks with the token offset advanced give the same result (f32 input).
        if c.dt == Dt::F32 && t >= 2 {
            let a = 1 + g.below(t - 1);
            let mut ids2 = vec![0u32; t * k];
            let mut w2 = vec![0.0f32; t * k];
            let (i0, i1) = ids2.split_at_mut(a * k);
            let (w0, w1) = w2.split_at_mut(a * k);
            noisy_topk(Rows::new(&c.data[..], a, e, c.stride).unwrap(),
                Rows::new(&nl[..], a, e, c.stride).unwrap(), k, noise, i0, w0).unwrap();
            let n2 = Noise { token_offset: noise.token_offset + a as u64, ..noise };
            noisy_topk(Rows::new(&c.data[a * c.stride..], t - a, e, c.stride).unwrap(),
                Rows::new(&nl[a * c.stride..], t - a, e, c.stride).unwrap(), k, n2, i1, w1).unwrap();
            prop_assert_eq!(&ids, &ids2);
            prop_assert_eq!(
                w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                w2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn grouped_sigmoid_matches_reference(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let n_group = [1usize, 2, 3, 4, 8, 16][g.below(6)];
        let size = 1 + g.below(40);
        let e = n_group * size;
        let group_score = if size >= 2 && g.chance(0.6) { GroupScore::Top2Sum } else { GroupScore::Max };
        let topk_group = 1 + g.below(n_group);
        let k = 1 + g.below((topk_group * size).min(MAX_K));
        let t = g.below(4);
        let dt = Dt::pick(&mut g);
        let tie = g.unit() * 0.5;
        let data: Vec<f32> = (0..t * e).map(|_| dt.round(g.logit(5.0, tie, 0.0))).collect();
        let bias: Vec<f32> = (0..e).map(|_| if g.chance(0.5) { 0.0 } else { g.range(-0.3, 0.3) as f32 }).collect();
        let use_bias = g.chance(0.7);
        let renormalize = g.chance(0.7);
        let scale = [1.0f32, 2.5, 0.5][g.below(3)];
        let cfg = GroupedConfig {
            k, scoring: Scoring::Sigmoid, bias: use_bias.then_some(&bias[..]), n_group, topk_group,
            group_score, renormalize, routed_scaling_factor: scale,
        };
        let c = Case { t, e, k, stride: e, dt, data };
        let mut ids = vec![0u32; t * k];
        let mut w = vec![0.0f32; t * k];
        let rep = with_rows!(c, |r| grouped_topk(r, &cfg, &mut ids, &mut w)).unwrap();
        prop_assert!(rep.is_clean());
        for tok in 0..t {
            let row = c.row(tok);
            let s: Vec<f32> = row.iter().map(|&x| sigmoid(x)).collect();
            let sel: Vec<f32> = (0..e).map(|i| if use_bias { s[i] + bias[i] } else { s[i] }).collect();
            let gscore: Vec<f32> = (0..n_group).map(|gi| {
                let mut v: Vec<f32> = sel[gi * size..(gi + 1) * size].to_vec();
                v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                match group_score { GroupScore::Top2Sum => v[0] + v[1], GroupScore::Max => v[0] }
            }).collect();
            let kept = ref_topk(&gscore, topk_group, |_| true);
            let want_ids = ref_topk(&sel, k, |i| kept.contains(&((i / size) as u32)));
            let id = &ids[tok * k..(tok + 1) * k];
            prop_assert_eq!(id, &want_ids[..]);
            let mut want: Vec<f64> = id.iter().map(|&i| s[i as usize] as f64).collect();
            if renormalize {
                let sum: f64 = want.iter().sum();
                if sum > 0.0 { want.iter_mut().for_each(|x| *x /= sum); }
            }
            for j in 0..k {
                close(w[tok * k + j] as f64, want[j] * scale as f64, 2e-6, "grouped weight");
            }
        }
    }

    #[test]
    fn grouped_softmax_without_groups_is_topk_softmax(seed in any::<u64>(), renorm in any::<bool>()) {
        let c = Case::make(seed, 0.2);
        let (t, k) = (c.t, c.k);
        let cfg = GroupedConfig::plain(k, Scoring::Softmax, renorm);
        let (mut i1, mut w1) = (vec![0u32; t * k], vec![0.0f32; t * k]);
        let (mut i2, mut w2) = (vec![0u32; t * k], vec![0.0f32; t * k]);
        let r1 = with_rows!(c, |r| grouped_topk(r, &cfg, &mut i1, &mut w1)).unwrap();
        let r2 = with_rows!(c, |r| topk_softmax(r, k, renorm, &mut i2, &mut w2)).unwrap();
        prop_assert_eq!(r1, r2);
        // Selection on rounded probabilities can only differ from selection
        // on logits where probabilities tie: compare the weights bitwise
        // (renormalized: grouped divides by the sum of probabilities,
        // topk_softmax takes the kept-logit softmax: equal up to rounding).
        if renorm {
            for (a, b) in w1.iter().zip(&w2) {
                prop_assert!((a - b).abs() <= 1e-6, "{} vs {}", a, b);
            }
        } else {
            prop_assert_eq!(
                w1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                w2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
        for tok in 0..t {
            for j in 0..k {
                let (a, b) = (i1[tok * k + j] as usize, i2[tok * k + j] as usize);
                if a != b {
                    let p = softmax64(c.row(tok));
                    prop_assert!((p[a] - p[b]).abs() <= 1e-7 * p[a].max(p[b]) + 1e-38);
                }
            }
        }
    }
}

#[test]
fn ties_go_to_the_lower_index() {
    let x = [0.5f32; 7];
    let (mut ids, mut w) = ([9u32; 3], [9.0f32; 3]);
    topk_softmax(Rows::single(&x), 3, false, &mut ids, &mut w).unwrap();
    assert_eq!(ids, [0, 1, 2]);
    assert!(w.iter().all(|&v| (v - 1.0 / 7.0).abs() < 1e-7));
    topk_softmax(Rows::single(&x), 3, true, &mut ids, &mut w).unwrap();
    assert!(w.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-7));
    let y = [1.0f32, 2.0, 0.0, 2.0, 2.0, -1.0];
    keep_topk_softmax(Rows::single(&y), 2, &mut ids[..2], &mut w[..2]).unwrap();
    assert_eq!(&ids[..2], &[1, 3]);
    assert_eq!(&w[..2], &[0.5, 0.5]);
    // Grouped: equal group scores keep the lower group.
    let z = [1.0f32, 1.0, 1.0, 1.0];
    let cfg = GroupedConfig {
        n_group: 2,
        topk_group: 1,
        group_score: GroupScore::Top2Sum,
        ..GroupedConfig::plain(2, Scoring::Sigmoid, true)
    };
    grouped_topk(Rows::single(&z), &cfg, &mut ids[..2], &mut w[..2]).unwrap();
    assert_eq!(&ids[..2], &[0, 1]);
}

#[test]
fn non_power_of_two_experts_and_k_equal_e() {
    for e in [3usize, 5, 144, 160, 384, 1000, MAX_EXPERTS] {
        let mut g = Gen(e as u64);
        let x: Vec<f32> = (0..e).map(|_| g.range(-3.0, 3.0) as f32).collect();
        let k = e.min(MAX_K);
        let (mut ids, mut w) = (vec![0u32; k], vec![0.0f32; k]);
        topk_softmax(Rows::single(&x), k, true, &mut ids, &mut w).unwrap();
        assert_eq!(ids, ref_topk(&x, k, |_| true));
        // Renormalized top-k softmax is the kept-logit softmax, bit for bit.
        let (mut ids2, mut w2) = (vec![0u32; k], vec![0.0f32; k]);
        keep_topk_softmax(Rows::single(&x), k, &mut ids2, &mut w2).unwrap();
        assert_eq!((&ids, &w), (&ids2, &w2));
        let total: f32 = w.iter().sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
    // k = E: a permutation in descending order; no renormalization needed.
    let x = [0.3f32, -1.0, 2.0, 0.3, 5.0];
    let (mut ids, mut w) = ([0u32; 5], [0.0f32; 5]);
    topk_softmax(Rows::single(&x), 5, false, &mut ids, &mut w).unwrap();
    assert_eq!(ids, [4, 2, 0, 3, 1]);
    let total: f64 = w.iter().map(|&v| v as f64).sum();
    assert!((total - 1.0).abs() < 1e-6);
}

#[test]
fn zero_and_one_token() {
    let empty: [f32; 0] = [];
    let r = Rows::new(&empty[..], 0, 8, 8).unwrap();
    let rep = topk_softmax(r, 2, true, &mut [], &mut []).unwrap();
    assert!(rep.is_clean());
    let bias = [0.0f32; 8];
    let cfg = GroupedConfig {
        k: 2,
        n_group: 4,
        topk_group: 2,
        ..GroupedConfig::deepseek_v3(&bias)
    };
    assert!(grouped_topk(r, &cfg, &mut [], &mut []).unwrap().is_clean());
    let x = [0.1f32, 0.9, 0.4, -0.2, 0.8, 0.0, 0.3, 0.2];
    let (mut ids, mut w) = ([0u32; 2], [0.0f32; 2]);
    keep_topk_softmax(Rows::single(&x), 2, &mut ids, &mut w).unwrap();
    assert_eq!(ids, [1, 4]);
    let e01 = (-0.1f64).exp();
    assert!((w[0] as f64 - 1.0 / (1.0 + e01)).abs() < 1e-7);
}

#[test]
fn nan_masked_and_infinite_rows() {
    let nan = f32::NAN;
    let ni = f32::NEG_INFINITY;
    let inf = f32::INFINITY;
    #[rustfmt::skip]
    let x = [
        1.0, nan, 2.0, 0.0,   // NaN row
        ni, ni, ni, ni,       // masked row
        0.0, inf, 1.0, inf,   // two +inf
        ni, 3.0, ni, ni,      // one finite
    ];
    let r = Rows::dense(&x, 4, 4).unwrap();
    let (mut ids, mut w) = ([0u32; 8], [0.0f32; 8]);
    let rep = topk_softmax(r, 2, false, &mut ids, &mut w).unwrap();
    assert_eq!((rep.nan_rows, rep.masked_rows), (1, 1));
    assert_eq!(&ids[..2], &[0, 1]);
    assert!(w[0].is_nan() && w[1].is_nan());
    assert_eq!(&ids[2..4], &[0, 1]);
    assert_eq!(&w[2..4], &[0.0, 0.0]);
    assert_eq!(&ids[4..6], &[1, 3]);
    assert_eq!(&w[4..6], &[0.5, 0.5]);
    assert_eq!(&ids[6..8], &[1, 0]);
    assert_eq!(&w[6..8], &[1.0, 0.0]);
    let rep = keep_topk_softmax(r, 2, &mut ids, &mut w).unwrap();
    assert_eq!((rep.nan_rows, rep.masked_rows), (1, 1));
    assert_eq!(&w[4..8], &[0.5, 0.5, 1.0, 0.0]);
    for scoring in [Scoring::Softmax, Scoring::Sigmoid] {
        let cfg = GroupedConfig::plain(2, scoring, true);
        let rep = grouped_topk(r, &cfg, &mut ids, &mut w).unwrap();
        assert_eq!((rep.nan_rows, rep.masked_rows), (1, 1));
        assert!(w[0].is_nan());
        assert_eq!(&ids[4..6], &[1, 3]);
        assert_eq!(&w[4..6], &[0.5, 0.5]);
    }
}

#[test]
fn bf16_input_equals_its_f32_widening() {
    let mut g = Gen(3);
    let (t, e, k) = (9, 96, 6);
    let xb: Vec<bf16> = (0..t * e)
        .map(|_| bf16::from_f32(g.range(-4.0, 4.0) as f32))
        .collect();
    let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let (mut i1, mut w1, mut i2, mut w2) = (
        vec![0u32; t * k],
        vec![0.0f32; t * k],
        vec![0u32; t * k],
        vec![0.0f32; t * k],
    );
    topk_softmax(Rows::dense(&xb, t, e).unwrap(), k, true, &mut i1, &mut w1).unwrap();
    topk_softmax(Rows::dense(&xf, t, e).unwrap(), k, true, &mut i2, &mut w2).unwrap();
    assert_eq!(i1, i2);
    assert_eq!(w1, w2);
}

#[test]
fn deepseek_v3_shape() {
    let mut g = Gen(11);
    let t = 16;
    let x: Vec<f32> = (0..t * 256).map(|_| g.range(-4.0, 4.0) as f32).collect();
    let bias: Vec<f32> = (0..256).map(|_| g.range(-0.1, 0.1) as f32).collect();
    let cfg = GroupedConfig::deepseek_v3(&bias);
    let (mut ids, mut w) = (vec![0u32; t * 8], vec![0.0f32; t * 8]);
    grouped_topk(Rows::dense(&x, t, 256).unwrap(), &cfg, &mut ids, &mut w).unwrap();
    for tok in 0..t {
        let id = &ids[tok * 8..tok * 8 + 8];
        let mut groups: Vec<u32> = id.iter().map(|&e| e / 32).collect();
        groups.sort();
        groups.dedup();
        assert!(groups.len() <= 4);
        let mut d = id.to_vec();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 8);
        let total: f32 = w[tok * 8..tok * 8 + 8].iter().sum();
        assert!((total - 2.5).abs() < 1e-5);
    }
}

#[test]
fn errors_name_the_parameter_and_write_nothing() {
    let x = [0.0f32; 12];
    let r = Rows::dense(&x, 2, 6).unwrap();
    let mut ids = [7u32; 4];
    let mut w = [7.0f32; 4];
    let untouched = |ids: &[u32], w: &[f32]| ids.iter().all(|&v| v == 7) && w.iter().all(|&v| v == 7.0);
    assert_eq!(
        topk_softmax(r, 0, true, &mut ids, &mut w).unwrap_err(),
        Error::OutOfRange { arg: "k", index: 0 }
    );
    assert_eq!(
        topk_softmax(r, 7, true, &mut ids, &mut w).unwrap_err(),
        Error::TooLarge {
            arg: "k",
            index: 0,
            max: 6,
            got: 7
        }
    );
    let big = vec![0.0f32; 40];
    assert_eq!(
        topk_softmax(Rows::single(&big), 33, true, &mut ids, &mut w).unwrap_err(),
        Error::TooLarge {
            arg: "k",
            index: 0,
            max: MAX_K,
            got: 33
        }
    );
    let huge = vec![0.0f32; MAX_EXPERTS + 1];
    assert!(matches!(
        topk_softmax(Rows::single(&huge), 2, true, &mut ids, &mut w).unwrap_err(),
        Error::TooLarge {
            arg: "logits.len",
            ..
        }
    ));
    assert_eq!(
        topk_softmax(Rows::single(&x[..0]), 1, true, &mut ids, &mut w).unwrap_err(),
        Error::Empty { arg: "logits.len" }
    );
    assert_eq!(
        topk_softmax(r, 2, true, &mut ids[..3], &mut w).unwrap_err(),
        Error::LengthMismatch {
            arg: "ids",
            index: 0,
            expected: 4,
            got: 3
        }
    );
    assert_eq!(
        keep_topk_softmax(r, 2, &mut ids, &mut w[..2]).unwrap_err(),
        Error::LengthMismatch {
            arg: "weights",
            index: 0,
            expected: 4,
            got: 2
        }
    );
    let n = [0.0f32; 10];
    let noise = Noise {
        seed: 1,
        layer: 0,
        token_offset: 0,
    };
    assert!(matches!(
        noisy_topk(r, Rows::dense(&n, 2, 5).unwrap(), 2, noise, &mut ids, &mut w).unwrap_err(),
        Error::LengthMismatch {
            arg: "noise_logits.len",
            ..
        }
    ));
    let far = Noise {
        token_offset: u64::MAX - 1,
        ..noise
    };
    assert_eq!(
        noisy_topk(r, r, 2, far, &mut ids, &mut w).unwrap_err(),
        Error::SizeOverflow {
            arg: "noise.token_offset"
        }
    );
    let bias = [0.0f32; 6];
    let base = GroupedConfig {
        k: 2,
        n_group: 3,
        topk_group: 1,
        ..GroupedConfig::deepseek_v3(&bias)
    };
    let bad = [
        (GroupedConfig { n_group: 4, ..base }, "n_group"),
        (GroupedConfig { n_group: 6, ..base }, "n_group"), // groups of 1 with Top2Sum
        (GroupedConfig { n_group: 0, ..base }, "n_group"),
        (
            GroupedConfig {
                topk_group: 0,
                ..base
            },
            "topk_group",
        ),
        (
            GroupedConfig {
                topk_group: 4,
                ..base
            },
            "topk_group",
        ),
        (
            GroupedConfig {
                routed_scaling_factor: 0.0,
                ..base
            },
            "routed_scaling_factor",
        ),
    ];
    for (cfg, arg) in bad {
        let err = grouped_topk(r, &cfg, &mut ids, &mut w).unwrap_err();
        assert_eq!(err, Error::OutOfRange { arg, index: 0 }, "{arg}");
    }
    assert_eq!(
        grouped_topk(r, &GroupedConfig { k: 3, ..base }, &mut [0; 6], &mut [0.0; 6]).unwrap_err(),
        Error::TooLarge {
            arg: "k",
            index: 0,
            max: 2,
            got: 3
        }
    );
    let nb = [0.0f32, f32::NAN, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(
        grouped_topk(
            r,
            &GroupedConfig {
                bias: Some(&nb),
                ..base
            },
            &mut ids,
            &mut w
        )
        .unwrap_err(),
        Error::NonFinite {
            arg: "bias",
            index: 1
        }
    );
    assert_eq!(
        grouped_topk(
            r,
            &GroupedConfig {
                routed_scaling_factor: f32::INFINITY,
                ..base
            },
            &mut ids,
            &mut w
        )
        .unwrap_err(),
        Error::NonFinite {
            arg: "routed_scaling_factor",
            index: 0
        }
    );
    assert!(untouched(&ids, &w));
}
