//! SLERP, NuSLERP, multi-SLERP and Karcher against f64 references of
//! mergekit's algorithms (the full-vector ones, not our Gram-matrix
//! shortcuts), plus the chunked/one-shot identity.

#![allow(clippy::needless_range_loop)]

mod merge_util;

use medley_core::Error;
use medley_core::merge::sphere::{
    KarcherOptions, KarcherStats, Layout, MultislerpOptions, MultislerpStats, Nuslerp, NuslerpOptions,
    SlerpOptions, SlerpStats, karcher, multislerp, nuslerp, nuslerp_t, slerp,
};
use merge_util::*;
use proptest::prelude::*;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}
fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// mergekit's slerp in f64: (output, tolerance scale, lerp taken).
fn slerp_ref(t: f64, v0: &[f32], v1: &[f32]) -> (Vec<f64>, Vec<f64>, bool) {
    let (a, b) = (f64s(v0), f64s(v1));
    let (na, nb) = (norm(&a), norm(&b));
    let da = if na > 1e-8 { na } else { 1.0 };
    let db = if nb > 1e-8 { nb } else { 1.0 };
    let d = dot(&a, &b) / (da * db);
    let (c0, c1, lerp) = if d.abs() > 0.9995 {
        (1.0 - t, t, true)
    } else {
        let th = d.acos();
        ((th - th * t).sin() / th.sin(), (th * t).sin() / th.sin(), false)
    };
    let out = a.iter().zip(&b).map(|(x, y)| c0 * x + c1 * y).collect();
    let sc = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (c0 * x).abs() + (c1 * y).abs())
        .collect();
    (out, sc, lerp)
}

/// Pairs of vectors: 0 random, 1 nearly parallel, 2 anti-parallel, 3 zero
/// first vector, 4 correlated.
fn pair(seed: u64, n: usize, kind: u8) -> (Vec<f32>, Vec<f32>) {
    let a = vec(seed, n, 1.0);
    let b = match kind % 5 {
        0 => vec(seed + 1, n, 2.0),
        1 => near(&a, seed + 1, 1e-5),
        2 => a.iter().map(|&x| -1.5 * x).collect(),
        3 => vec(seed + 1, n, 1.0),
        _ => near(&a, seed + 1, 0.5),
    };
    let a = if kind % 5 == 3 { vec![0.0; n] } else { a };
    (a, b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn slerp_matches_mergekit_and_any_chunking(
        seed in any::<u64>(), n in 2usize..3000, kind in 0u8..5, t in -0.5f32..1.5, parts in 0usize..8,
    ) {
        let (a, b) = pair(seed, n, kind);
        let mut out = vec![0.0f32; n];
        let p = slerp(&a, &b, &SlerpOptions::new(t), &mut out).unwrap();
        let (want, sc, lerp) = slerp_ref(t as f64, &a, &b);
        prop_assert_eq!(p.lerp, lerp);
        assert_close(&out, &want, &sc, 1e-6, 1e-30);
        let mut st = SlerpStats::new(n, &SlerpOptions::new(t)).unwrap();
        for w in cuts(seed, n, parts).windows(2) {
            st.feed(&a[w[0]..w[1]], &b[w[0]..w[1]]).unwrap();
        }
        prop_assert_eq!(st.finish().unwrap(), p);
    }

    #[test]
    fn slerp_endpoints_are_exact(seed in any::<u64>(), n in 1usize..500, kind in 0u8..5) {
        let (a, b) = pair(seed, n, kind);
        let mut out = vec![0.0f32; n];
        slerp(&a, &b, &SlerpOptions::new(0.0), &mut out).unwrap();
        assert_bits(&out, &a);
        slerp(&a, &b, &SlerpOptions::new(1.0), &mut out).unwrap();
        assert_bits(&out, &b);
    }

    #[test]
    fn nuslerp_matches_mergekit_in_every_layout(
        seed in any::<u64>(), rows in 1usize..30, cols in 1usize..30, layout in 0u8..3, with_base in any::<bool>(),
        w0 in 0.1f32..2.0, w1 in 0.1f32..2.0, parts in 0usize..6,
    ) {
        let n = rows * cols;
        let base = vec(seed, n, 1.0);
        let x0 = near(&base, seed + 1, 0.2);
        let x1 = if seed % 3 == 0 { x0.clone() } else { near(&base, seed + 2, 0.2) };
        let lay = [Layout::Flat, Layout::Rows(cols), Layout::Columns(cols)][layout as usize];
        let opts = NuslerpOptions { layout: lay, ..NuslerpOptions::new() };
        let b = with_base.then_some(&base[..]);
        let plan = Nuslerp::new(n, [w0, w1], &opts).unwrap();
        let mut scratch = vec![0.0f64; plan.scratch_len()];
        let mut out = vec![0.0f32; n];
        nuslerp(&x0, &x1, b, [w0, w1], &opts, &mut scratch, &mut out).unwrap();
        // Reference: vectors as mergekit takes them.
        let t = w1 as f64 / (w0 as f64 + w1 as f64);
        let v = |x: &[f32], j: usize| x[j] as f64 - if with_base { base[j] as f64 } else { 0.0 };
        let groups: Vec<Vec<usize>> = match lay {
            Layout::Flat => vec![(0..n).collect()],
            Layout::Rows(c) => (0..rows).map(|r| (r * c..(r + 1) * c).collect()).collect(),
            Layout::Columns(c) => (0..c).map(|col| (0..rows).map(|r| r * c + col).collect()).collect(),
        };
        let mut want = vec![0.0f64; n];
        let mut sc = vec![0.0f64; n];
        for g in &groups {
            let a: Vec<f64> = g.iter().map(|&j| v(&x0, j)).collect();
            let c: Vec<f64> = g.iter().map(|&j| v(&x1, j)).collect();
            let cos = (dot(&a, &c) / (norm(&a).max(1e-7) * norm(&c).max(1e-7))).clamp(-1.0, 1.0);
            let th = cos.acos();
            let (c0, c1) = if th.sin().abs() < 1e-8 { (1.0 - t, t) } else { (((1.0 - t) * th).sin() / th.sin(), (t * th).sin() / th.sin()) };
            for (k, &j) in g.iter().enumerate() {
                let bj = if with_base { base[j] as f64 } else { 0.0 };
                want[j] = bj + c0 * a[k] + c1 * c[k];
                sc[j] = bj.abs() + (c0 * a[k]).abs() + (c1 * c[k]).abs();
            }
        }
        assert_close(&out, &want, &sc, 2e-6, 1e-30);
        // Chunked.
        let mut scratch = vec![0.0f64; plan.scratch_len()];
        let mut st = plan.stats(&mut scratch).unwrap();
        let fc = cuts(seed ^ 3, n, parts);
        for w in fc.windows(2) {
            st.feed(&x0[w[0]..w[1]], &x1[w[0]..w[1]], b.map(|b| &b[w[0]..w[1]])).unwrap();
        }
        let ap = st.finish().unwrap();
        let ac = if matches!(lay, Layout::Rows(_)) { row_cuts(seed, n, cols, parts) } else { cuts(seed ^ 4, n, parts) };
        let mut ch = vec![SENTINEL; n];
        for w in ac.windows(2).rev() {
            ap.apply(&x0[w[0]..w[1]], &x1[w[0]..w[1]], b.map(|b| &b[w[0]..w[1]]), w[0], &mut ch[w[0]..w[1]]).unwrap();
        }
        assert_bits(&ch, &out);
    }

    #[test]
    fn multislerp_matches_mergekit_tangent_space_algorithm(
        seed in any::<u64>(), n in 2usize..1500, m in 2usize..6, with_base in any::<bool>(), parts in 0usize..6,
    ) {
        let base = vec(seed, n, 1.0);
        let models: Vec<Vec<f32>> = (0..m).map(|i| near(&base, seed + 1 + i as u64, 0.3)).collect();
        let w: Vec<f32> = (0..m).map(|i| 0.5 + i as f32 * 0.25).collect();
        let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
        let b = with_base.then_some(&base[..]);
        let mut out = vec![0.0f32; n];
        multislerp(&views, b, &w, &MultislerpOptions::new(), &mut out).unwrap();
        // mergekit's algorithm, in f64, on full vectors.
        let ws: f64 = w.iter().map(|&x| x as f64).sum();
        let wn: Vec<f64> = w.iter().map(|&x| x as f64 / ws).collect();
        let vs: Vec<Vec<f64>> = models
            .iter()
            .map(|x| x.iter().zip(&base).map(|(&a, &bb)| a as f64 - if with_base { bb as f64 } else { 0.0 }).collect())
            .collect();
        let norms: Vec<f64> = vs.iter().map(|v| norm(v)).collect();
        let units: Vec<Vec<f64>> = vs.iter().zip(&norms).map(|(v, &nv)| v.iter().map(|x| x / (nv + 1e-8)).collect()).collect();
        let mut mean = vec![0.0f64; n];
        for (u, &wi) in units.iter().zip(&wn) {
            for j in 0..n {
                mean[j] += wi * u[j];
            }
        }
        let mn = norm(&mean);
        let mean: Vec<f64> = mean.iter().map(|x| x / mn).collect();
        let mut tang = vec![0.0f64; n];
        for (u, &wi) in units.iter().zip(&wn) {
            let d = dot(u, &mean);
            for j in 0..n {
                tang[j] += wi * (u[j] - d * mean[j]);
            }
        }
        let tn = norm(&tang) + 1e-8;
        let scale: f64 = norms.iter().zip(&wn).map(|(a, b)| a * b).sum();
        let want: Vec<f64> = (0..n)
            .map(|j| {
                let r = (mean[j] * tn.cos() + tang[j] * (tn.sin() / tn)) * scale;
                r + if with_base { base[j] as f64 } else { 0.0 }
            })
            .collect();
        let sc: Vec<f64> = (0..n).map(|j| base[j].abs() as f64 + scale * (mean[j].abs() + 1e-3)).collect();
        assert_close(&out, &want, &sc, 1e-5, 1e-30);
        // Chunked statistics give the same combination.
        let mut st = MultislerpStats::new(n, &w, with_base, &MultislerpOptions::new()).unwrap();
        for c in cuts(seed, n, parts).windows(2) {
            let v: Vec<&[f32]> = models.iter().map(|x| &x[c[0]..c[1]]).collect();
            st.feed(&v, b.map(|b| &b[c[0]..c[1]])).unwrap();
        }
        let comb = st.finish().unwrap();
        let mut ch = vec![0.0f32; n];
        comb.apply(&views, b, &mut ch).unwrap();
        assert_bits(&ch, &out);
    }

    #[test]
    fn karcher_matches_mergekit_iteration(
        seed in any::<u64>(), n in 2usize..800, m in 2usize..6, spread in 0.05f32..1.5, parts in 0usize..6,
    ) {
        let c = vec(seed, n, 1.0);
        let models: Vec<Vec<f32>> = (0..m).map(|i| near(&c, seed + 1 + i as u64, spread)).collect();
        let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
        let w = vec![1.0f32; m];
        let opts = KarcherOptions::new();
        let mut out = vec![0.0f32; n];
        karcher(&views, &w, &opts, &mut out).unwrap();
        // mergekit's karcher_merge_tensors in f64 on full vectors.
        let xs: Vec<Vec<f64>> = models.iter().map(|x| f64s(x)).collect();
        let norms: Vec<f64> = xs.iter().map(|x| norm(x)).collect();
        let units: Vec<Vec<f64>> = xs.iter().zip(&norms).map(|(x, &nx)| x.iter().map(|v| v / nx).collect()).collect();
        let a = 1.0 / m as f64;
        let mut mean = vec![0.0f64; n];
        for u in &units {
            for j in 0..n {
                mean[j] += a * u[j];
            }
        }
        let mn = norm(&mean);
        for v in mean.iter_mut() {
            *v /= mn;
        }
        for _ in 0..10 {
            let mut t = vec![0.0f64; n];
            for u in &units {
                let d = dot(&mean, u).clamp(-1.0, 1.0);
                let th = d.acos();
                if th < 1e-5 {
                    continue;
                }
                for j in 0..n {
                    t[j] += a * (th / th.sin()) * (u[j] - d * mean[j]);
                }
            }
            let tn = norm(&t);
            if tn < 1e-5 {
                break;
            }
            for j in 0..n {
                mean[j] = tn.cos() * mean[j] + tn.sin() * t[j] / tn;
            }
            let un = norm(&mean);
            for v in mean.iter_mut() {
                *v /= un;
            }
        }
        let scale: f64 = norms.iter().map(|x| a * x).sum();
        let want: Vec<f64> = mean.iter().map(|v| scale * v).collect();
        let sc: Vec<f64> = vec![scale / (n as f64).sqrt(); n];
        assert_close(&out, &want, &sc, 2e-5, 1e-30);
        let mut st = KarcherStats::new(n, &w, &opts).unwrap();
        for cc in cuts(seed, n, parts).windows(2) {
            let v: Vec<&[f32]> = models.iter().map(|x| &x[cc[0]..cc[1]]).collect();
            st.feed(&v).unwrap();
        }
        let mut ch = vec![0.0f32; n];
        st.finish().unwrap().apply(&views, None, &mut ch).unwrap();
        assert_bits(&ch, &out);
    }
}

#[test]
fn parallel_and_antiparallel_vectors_fall_back_to_lerp() {
    let a = vec(1, 100, 1.0);
    let par: Vec<f32> = a.iter().map(|&x| 3.0 * x).collect();
    let anti: Vec<f32> = a.iter().map(|&x| -0.5 * x).collect();
    for b in [&par, &anti] {
        let mut out = vec![0.0f32; 100];
        let p = slerp(&a, b, &SlerpOptions::new(0.25), &mut out).unwrap();
        assert!(p.lerp);
        assert_eq!((p.c0, p.c1), (0.75, 0.25));
        // NuSLERP falls back only when sin(theta) underflows 1e-8.
        let mut s = [];
        nuslerp(&a, b, None, [3.0, 1.0], &NuslerpOptions::new(), &mut s, &mut out).unwrap();
        for j in 0..100 {
            assert!((out[j] - (0.75 * a[j] + 0.25 * b[j])).abs() < 1e-5);
        }
    }
    // A zero base tensor is not normalized: theta = pi/2 (mergekit).
    let z = vec![0.0f32; 100];
    let mut out = vec![0.0f32; 100];
    let p = slerp(&z, &a, &SlerpOptions::new(0.5), &mut out).unwrap();
    assert!(!p.lerp);
    assert!((p.c1 - std::f32::consts::FRAC_PI_4.sin()).abs() < 1e-6);
}

#[test]
fn nuslerp_t_from_weights() {
    assert_eq!(nuslerp_t(1.0, 3.0), 0.75);
    assert_eq!(nuslerp_t(1.0, -1.0), 0.5);
    assert_eq!(nuslerp_t(0.0, 0.0), 0.5);
}

#[test]
fn multislerp_degenerate_cases() {
    let a = vec(3, 64, 1.0);
    let neg: Vec<f32> = a.iter().map(|&x| -x).collect();
    let mut out = vec![SENTINEL; 64];
    // One model: returned as is (even with a base).
    let base = vec(4, 64, 1.0);
    multislerp(
        &[&a[..]],
        Some(&base),
        &[2.0],
        &MultislerpOptions::new(),
        &mut out,
    )
    .unwrap();
    assert_bits(&out, &a);
    // Antipodal pair with equal weights: lerp fallback (here: zeros).
    multislerp(
        &[&a[..], &neg[..]],
        None,
        &[1.0, 1.0],
        &MultislerpOptions::new(),
        &mut out,
    )
    .unwrap();
    assert!(out.iter().all(|&v| v.abs() < 1e-6));
    // Three models cancelling: an error, nothing written.
    let mut out = vec![SENTINEL; 64];
    let e = multislerp(
        &[&a[..], &neg[..], &a[..]],
        None,
        &[1.0, 2.0, 1.0],
        &MultislerpOptions::new(),
        &mut out,
    )
    .unwrap_err();
    assert_eq!(
        e,
        Error::ZeroSum {
            arg: "weights",
            index: 0
        }
    );
    assert!(out.iter().all(|&v| v == SENTINEL));
}

#[test]
fn karcher_of_identical_directions_is_the_weighted_norm_times_direction() {
    let a = vec(5, 200, 1.0);
    let b: Vec<f32> = a.iter().map(|&x| 2.0 * x).collect();
    let z = vec![0.0f32; 200];
    let mut out = vec![0.0f32; 200];
    // The zero input counts in the scale, not in the direction (mergekit).
    karcher(
        &[&a[..], &b[..], &z[..]],
        &[1.0, 1.0, 1.0],
        &KarcherOptions::new(),
        &mut out,
    )
    .unwrap();
    for j in 0..200 {
        assert!((out[j] - a[j]).abs() < 1e-6, "{} vs {}", out[j], a[j]);
    }
    karcher(&[&z[..], &z[..]], &[1.0, 1.0], &KarcherOptions::new(), &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
}

#[test]
fn bad_input_is_rejected_and_leaves_out_untouched() {
    let a = vec(1, 10, 1.0);
    let b = vec(2, 9, 1.0);
    let mut out = vec![SENTINEL; 10];
    assert_eq!(
        slerp(&a, &b, &SlerpOptions::new(0.5), &mut out).unwrap_err(),
        Error::LengthMismatch {
            arg: "v1",
            index: 0,
            expected: 10,
            got: 9
        }
    );
    assert_eq!(
        slerp(&a, &a, &SlerpOptions::new(f32::NAN), &mut out).unwrap_err(),
        Error::NonFinite { arg: "t", index: 0 }
    );
    let mut s = [];
    let o = NuslerpOptions {
        layout: Layout::Rows(3),
        ..NuslerpOptions::new()
    };
    assert_eq!(
        nuslerp(&a, &a, None, [1.0, 1.0], &o, &mut s, &mut out).unwrap_err(),
        Error::OutOfRange {
            arg: "layout",
            index: 0
        }
    );
    let o = NuslerpOptions {
        layout: Layout::Columns(5),
        ..NuslerpOptions::new()
    };
    assert_eq!(
        nuslerp(&a, &a, None, [1.0, 1.0], &o, &mut s, &mut out).unwrap_err(),
        Error::BufferTooShort {
            arg: "scratch",
            needed: 15,
            got: 0
        }
    );
    assert_eq!(
        nuslerp(
            &a,
            &a,
            None,
            [f32::INFINITY, 1.0],
            &NuslerpOptions::new(),
            &mut s,
            &mut out
        )
        .unwrap_err(),
        Error::NonFinite {
            arg: "weights",
            index: 0
        }
    );
    assert_eq!(
        multislerp(
            &[&a[..], &a[..]],
            None,
            &[1.0, -1.0],
            &MultislerpOptions::new(),
            &mut out
        )
        .unwrap_err(),
        Error::ZeroSum {
            arg: "weights",
            index: 0
        }
    );
    let many: Vec<&[f32]> = (0..17).map(|_| &a[..]).collect();
    assert!(matches!(
        karcher(&many, &[1.0; 17], &KarcherOptions::new(), &mut out),
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(
        karcher(&[&a[..], &a[..]], &[1.0, -1.0], &KarcherOptions::new(), &mut out).unwrap_err(),
        Error::OutOfRange {
            arg: "weights",
            index: 1
        }
    );
    assert!(out.iter().all(|&v| v == SENTINEL));
    let mut st = SlerpStats::new(10, &SlerpOptions::new(0.5)).unwrap();
    st.feed(&a[..4], &a[..4]).unwrap();
    assert_eq!(
        st.finish().unwrap_err(),
        Error::LengthMismatch {
            arg: "v0",
            index: 0,
            expected: 10,
            got: 4
        }
    );
    assert!(matches!(st.feed(&a, &a), Err(Error::TooLarge { arg: "v0", .. })));
}

#[test]
fn karcher_refuses_more_iterations_than_its_bound() {
    use medley_core::merge::sphere::KARCHER_MAX_ITER;
    let a = vec(1, 16, 1.0);
    let b = vec(2, 16, 1.0);
    let mut out = vec![SENTINEL; 16];
    let opts = KarcherOptions {
        max_iter: KARCHER_MAX_ITER + 1,
        ..KarcherOptions::new()
    };
    assert_eq!(
        karcher(&[&a[..], &b[..]], &[1.0, 1.0], &opts, &mut out),
        Err(Error::TooLarge {
            arg: "max_iter",
            index: 0,
            max: KARCHER_MAX_ITER as usize,
            got: KARCHER_MAX_ITER as usize + 1,
        })
    );
    assert!(out.iter().all(|&v| v == SENTINEL));
    let opts = KarcherOptions {
        max_iter: KARCHER_MAX_ITER,
        ..KarcherOptions::new()
    };
    karcher(&[&a[..], &b[..]], &[1.0, 1.0], &opts, &mut out).unwrap();
}
