#![allow(clippy::needless_range_loop)]
//! Auxiliary losses and load statistics against f64 references.

mod moe_util;

use medley_core::moe::NO_EXPERT;
use medley_core::moe::aux::{
    bias_update, cv_squared, expert_counts, importance, noisy_load, switch_loss, z_loss,
};
use medley_core::moe::gating::{Noise, noisy_logit, topk_softmax};
use medley_core::{Error, Rows};
use moe_util::{Gen, close, logsumexp64, phi64, ref_topk, softmax64, softplus64};
use proptest::prelude::*;

fn batch(g: &mut Gen) -> (usize, usize, usize, Vec<f32>) {
    let t = g.below(20);
    let e = 1 + g.below(70);
    let k = 1 + g.below(e.min(8));
    let mask = if g.chance(0.3) { 0.2 } else { 0.0 };
    let x = (0..t * e).map(|_| g.logit(5.0, 0.2, mask)).collect();
    (t, e, k, x)
}

fn cv2_ref(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    if m == 0.0 {
        return 0.0;
    }
    v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n / (m * m)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn switch_and_z_loss_match_reference(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let (t, e, k, x) = batch(&mut g);
        let r = Rows::dense(&x, t, e).unwrap();
        let mut ids = vec![0u32; t * k];
        let mut w = vec![0.0f32; t * k];
        topk_softmax(r, k, true, &mut ids, &mut w).unwrap();
        for v in ids.iter_mut() {
            if g.chance(0.1) { *v = NO_EXPERT; }
        }
        let mut f = vec![9.0f64; e];
        let mut p = vec![9.0f64; e];
        let loss = switch_loss(r, &ids, k, &mut f, &mut p).unwrap();
        let mut fr = vec![0.0f64; e];
        let mut pr = vec![0.0f64; e];
        for &i in &ids { if i != NO_EXPERT { fr[i as usize] += 1.0 / (t * k) as f64; } }
        for tok in 0..t {
            let s = softmax64(&x[tok * e..(tok + 1) * e]);
            for i in 0..e { pr[i] += s[i] / t as f64; }
        }
        let want: f64 = e as f64 * (0..e).map(|i| fr[i] * pr[i]).sum::<f64>();
        for i in 0..e {
            close(f[i], fr[i], 1e-12, "fraction");
            close(p[i], pr[i], 1e-6, "mean prob");
        }
        close(loss as f64, want, 1e-5, "switch loss");
        // z-loss.
        let z = z_loss(r).unwrap();
        let want = if t == 0 { 0.0 } else {
            (0..t).map(|tok| logsumexp64(&x[tok * e..(tok + 1) * e]).powi(2)).sum::<f64>() / t as f64
        };
        if want.is_infinite() {
            prop_assert_eq!(z, f32::INFINITY);
        } else {
            close(z as f64, want, 1e-5, "z loss");
        }
        // Importance and its CV^2.
        let mut imp = vec![0.0f64; e];
        importance(&ids, &w, &mut imp).unwrap();
        let mut ir = vec![0.0f64; e];
        for s in 0..ids.len() { if ids[s] != NO_EXPERT { ir[ids[s] as usize] += w[s] as f64; } }
        for i in 0..e { close(imp[i], ir[i], 1e-12, "importance"); }
        close(cv_squared(&imp).unwrap() as f64, cv2_ref(&ir), 1e-6, "cv2");
        // Counts.
        let mut counts = vec![0u64; e];
        let routed = expert_counts(&ids, &mut counts).unwrap();
        prop_assert_eq!(routed, ids.iter().filter(|&&i| i != NO_EXPERT).count() as u64);
        for i in 0..e {
            prop_assert_eq!(counts[i], ids.iter().filter(|&&v| v == i as u32).count() as u64);
        }
    }

    #[test]
    fn noisy_load_matches_reference(seed in any::<u64>(), nseed in any::<u64>()) {
        let mut g = Gen(seed);
        let (t, e, k, x) = batch(&mut g);
        let n: Vec<f32> = (0..t * e).map(|_| g.range(-4.0, 1.0) as f32).collect();
        let noise = Noise { seed: nseed, layer: 3, token_offset: g.below(100) as u64 };
        let mut load = vec![0.0f64; e];
        let rep = noisy_load(Rows::dense(&x, t, e).unwrap(), Rows::dense(&n, t, e).unwrap(), k, noise, &mut load).unwrap();
        let mut want = vec![0.0f64; e];
        let mut masked = 0;
        for tok in 0..t {
            let h: Vec<f32> = (0..e).map(|i| noisy_logit(x[tok * e + i], n[tok * e + i], noise.sample(e, tok, i))).collect();
            if h.iter().all(|&v| v == f32::NEG_INFINITY) { masked += 1; continue; }
            let order = ref_topk(&h, e, |_| true);
            for i in 0..e {
                let pos = order.iter().position(|&o| o as usize == i).unwrap();
                // k-th largest of H without i.
                let thr = if pos < k {
                    if k < e { h[order[k] as usize] } else { f32::NEG_INFINITY }
                } else {
                    h[order[k - 1] as usize]
                };
                let xi = x[tok * e + i];
                let d = if xi == thr { 0.0 } else { xi as f64 - thr as f64 };
                let sd = softplus64(n[tok * e + i] as f64);
                want[i] += phi64(d / sd);
            }
        }
        prop_assert_eq!(rep.masked_rows, masked);
        for i in 0..e {
            prop_assert!((load[i] - want[i]).abs() <= 1e-5 * (1.0 + want[i]), "{} vs {}", load[i], want[i]);
        }
    }
}

#[test]
fn uniform_routing_gives_switch_loss_one() {
    // Equal logits: P_e = 1/E; round-robin ids: f_e = 1/E; loss = E * E * (1/E^2) = 1.
    let (t, e, k) = (8, 4, 2);
    let x = vec![0.0f32; t * e];
    let ids: Vec<u32> = (0..t * k).map(|s| (s % e) as u32).collect();
    let (mut f, mut p) = (vec![0.0; e], vec![0.0; e]);
    let loss = switch_loss(Rows::dense(&x, t, e).unwrap(), &ids, k, &mut f, &mut p).unwrap();
    assert!((loss - 1.0).abs() < 1e-6);
    // All to one expert with confident probabilities: loss near E.
    let mut x = vec![-30.0f32; t * e];
    for tok in 0..t {
        x[tok * e] = 30.0;
    }
    let ids = vec![0u32; t];
    let loss = switch_loss(Rows::dense(&x, t, e).unwrap(), &ids, 1, &mut f, &mut p).unwrap();
    assert!((loss - 4.0).abs() < 1e-5);
    // T = 0.
    let loss = switch_loss(Rows::new(&x[..0], 0, e, e).unwrap(), &[], 1, &mut f, &mut p).unwrap();
    assert_eq!(loss, 0.0);
    assert_eq!(z_loss(Rows::new(&x[..0], 0, e, e).unwrap()).unwrap(), 0.0);
}

#[test]
fn cv_squared_edges() {
    assert_eq!(cv_squared(&[]).unwrap_err(), Error::Empty { arg: "values" });
    assert_eq!(cv_squared(&[3.0]).unwrap(), 0.0);
    assert_eq!(cv_squared(&[0.0, 0.0]).unwrap(), 0.0);
    assert_eq!(cv_squared(&[1.0, 1.0, 1.0]).unwrap(), 0.0);
    // [0, 2]: mean 1, population variance 1.
    assert_eq!(cv_squared(&[0.0, 2.0]).unwrap(), 1.0);
    assert!(cv_squared(&[f64::NAN, 1.0]).unwrap().is_nan());
}

#[test]
fn z_loss_edges() {
    let ni = f32::NEG_INFINITY;
    assert_eq!(z_loss(Rows::single(&[ni, ni])).unwrap(), f32::INFINITY);
    assert!(z_loss(Rows::single(&[f32::NAN, 0.0])).unwrap().is_nan());
    let v = z_loss(Rows::single(&[0.0f32, 0.0])).unwrap();
    assert!((v as f64 - 2f64.ln().powi(2)).abs() < 1e-6);
    assert_eq!(
        z_loss(Rows::single(&[0.0f32; 0])).unwrap_err(),
        Error::Empty { arg: "logits.len" }
    );
}

#[test]
fn bias_update_moves_toward_balance() {
    let counts = [10u64, 2, 6, 6];
    let mut b = [0.0f32, 0.0, 1.0, -1.0];
    bias_update(&counts, 0.001, &mut b).unwrap();
    assert_eq!(b, [-0.001, 0.001, 1.0, -1.0]);
    assert_eq!(
        bias_update(&counts, -1.0, &mut b).unwrap_err(),
        Error::OutOfRange {
            arg: "gamma",
            index: 0
        }
    );
    let mut big = [f32::MAX, 0.0, 0.0, 0.0];
    assert_eq!(
        bias_update(&[0, 1, 1, 1], f32::MAX, &mut big).unwrap_err(),
        Error::NonFinite {
            arg: "bias",
            index: 0
        }
    );
    assert_eq!(big, [f32::MAX, 0.0, 0.0, 0.0]);
}

#[test]
fn aux_errors() {
    let x = [0.0f32; 8];
    let r = Rows::dense(&x, 2, 4).unwrap();
    let (mut f, mut p) = ([7.0; 4], [7.0; 4]);
    assert_eq!(
        switch_loss(r, &[0, 1, 4, 2], 2, &mut f, &mut p).unwrap_err(),
        Error::IndexOutOfBounds {
            arg: "ids",
            index: 4,
            bound: 4
        }
    );
    assert!(matches!(
        switch_loss(r, &[0, 1, 2], 2, &mut f, &mut p).unwrap_err(),
        Error::LengthMismatch { arg: "ids", .. }
    ));
    assert!(f.iter().chain(&p).all(|&v| v == 7.0));
    let mut out = [7.0f64; 4];
    assert!(matches!(
        importance(&[0, 1], &[1.0], &mut out).unwrap_err(),
        Error::LengthMismatch { arg: "weights", .. }
    ));
    assert!(matches!(
        noisy_load(
            r,
            r,
            2,
            Noise {
                seed: 0,
                layer: 0,
                token_offset: 0
            },
            &mut out[..3]
        )
        .unwrap_err(),
        Error::LengthMismatch { arg: "out", .. }
    ));
    assert!(out.iter().all(|&v| v == 7.0));
}
