//! `sample::sample` and `sample::combine_sample` against a sorting
//! reference written from the module's definition, the Gumbel variate
//! against f64, the sampled frequencies against the truncated
//! distribution, and the documented edge cases and errors.

mod common;

use common::Gen;
use medley_core::ensemble::{Config, Model, NO_TOKEN, Output, combine};
use medley_core::math::exp;
use medley_core::rng::word;
use medley_core::sample::{Sampled, Sampling, combine_sample, gumbel, key_score, sample, score_key};
use medley_core::{Error, Rows, RowsMut, bf16};
use proptest::prelude::*;

/// The kept set by sorting: `L >= max(t_k, t_min, t_p)` as the module
/// notes define them.
fn ref_kept(row: &[f32], s: &Sampling) -> Vec<bool> {
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
        let w = |x: f32| exp((x - l_max) * r.inv_t) as f64;
        let k1: Vec<f32> = cand.iter().copied().filter(|&x| x >= t).collect();
        let z1: f64 = k1.iter().map(|&x| w(x)).sum();
        let target = s.top_p as f64 * z1;
        let mut cum = 0.0;
        let mut i = 0;
        while i < k1.len() {
            // a run of ties counts as one step
            let mut j = i;
            while j < k1.len() && k1[j] == k1[i] {
                cum += w(k1[j]);
                j += 1;
            }
            if cum >= target * (1.0 - 1e-12) {
                t = t.max(k1[i]);
                break;
            }
            i = j;
        }
    }
    row.iter().map(|&x| x.is_finite() && x >= t).collect()
}

/// The token by the definition: argmax over the kept set of
/// `L * (1 / tau) + g(seed, [row, step], v)`, lowest index among ties.
fn ref_token(row: &[f32], s: &Sampling, b: u32) -> u32 {
    let r = s.resolve().unwrap();
    if row.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
        return NO_TOKEN;
    }
    if !row.iter().any(|x| x.is_finite()) {
        return NO_TOKEN;
    }
    if r.greedy {
        let mut best = 0;
        for (v, &x) in row.iter().enumerate() {
            if x > row[best] || !row[best].is_finite() && x.is_finite() {
                best = v;
            }
        }
        return best as u32;
    }
    let kept = ref_kept(row, s);
    let mut best = f32::NEG_INFINITY;
    let mut tok = NO_TOKEN;
    for (v, &x) in row.iter().enumerate() {
        if !kept[v] {
            continue;
        }
        let y = x * r.inv_t + gumbel(word(s.seed, [b, s.step], v as u64));
        if y > best || tok == NO_TOKEN {
            best = y;
            tok = v as u32;
        }
    }
    tok
}

fn row_gen(g: &mut Gen, v: usize) -> Vec<f32> {
    let ties = g.chance(0.3);
    let scale = g.range(0.5, 12.0);
    let p_mask = if g.chance(0.3) { 0.4 } else { 0.0 };
    (0..v)
        .map(|_| {
            let x = g.logit(scale, p_mask);
            if ties && x.is_finite() {
                (x * 2.0).round() / 2.0
            } else {
                x
            }
        })
        .collect()
}

fn params_gen(g: &mut Gen, v: usize) -> Sampling {
    let mut s = Sampling::new(
        if g.chance(0.1) {
            0.0
        } else {
            g.range(0.05, 3.0) as f32
        },
        g.next_u64(),
    );
    s.step = g.next_u64() as u32;
    if g.chance(0.5) {
        s.top_k = g.below(v + 3) as u32;
    }
    if g.chance(0.5) {
        s.top_p = g.range(0.01, 1.0) as f32;
    }
    if g.chance(0.4) {
        s.min_p = g.range(0.0, 1.0) as f32;
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn tokens_follow_the_definition(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let v = match g.below(4) { 0 => 1 + g.below(8), 1 => 1 + g.below(300), 2 => 2049 + g.below(3000), _ => 1 + g.below(5000) };
        let rows = 1 + g.below(4);
        let data: Vec<f32> = (0..rows).flat_map(|_| row_gen(&mut g, v)).collect();
        let s = params_gen(&mut g, v);
        let mut tok = vec![7u32; rows];
        let mut lp = vec![7.0f32; rows];
        let rep = sample(
            Rows::new(&data, rows, v, v).unwrap(),
            &s,
            Sampled { tokens: &mut tok, log_probs: Some(&mut lp) },
        ).unwrap();
        let mut masked = 0;
        for b in 0..rows {
            let row = &data[b * v..(b + 1) * v];
            let want = ref_token(row, &s, b as u32);
            prop_assert_eq!(tok[b], want, "row {} params {:?}", b, s);
            if want == NO_TOKEN {
                masked += 1;
                prop_assert_eq!(lp[b], f32::NEG_INFINITY);
            } else {
                prop_assert_eq!(lp[b], row[want as usize]);
                // the argmax is always kept; the token always is
                prop_assert!(ref_kept(row, &s)[want as usize] || s.temperature == 0.0);
            }
        }
        prop_assert_eq!(rep.masked_rows, masked);
        prop_assert_eq!(rep.nan_rows, 0);
    }

    #[test]
    fn half_precision_rows_sample_like_their_f32_widening(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let v = 1 + g.below(3000);
        let row: Vec<bf16> = row_gen(&mut g, v).into_iter().map(bf16::from_f32).collect();
        let wide: Vec<f32> = row.iter().map(|x| x.to_f32()).collect();
        let s = params_gen(&mut g, v);
        let (mut a, mut b) = ([0u32], [0u32]);
        sample(Rows::single(&row), &s, Sampled { tokens: &mut a, log_probs: None }).unwrap();
        sample(Rows::single(&wide), &s, Sampled { tokens: &mut b, log_probs: None }).unwrap();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn combine_sample_is_combine_then_sample(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let (rows, v) = (1 + g.below(3), 1 + g.below(700));
        let a: Vec<f32> = (0..rows * v).map(|_| g.logit(4.0, 0.1)).collect();
        let bm: Vec<f32> = (0..rows * v).map(|_| g.logit(4.0, 0.1)).collect();
        let models = [
            Model::new(Rows::new(&a, rows, v, v).unwrap()),
            Model::new(Rows::new(&bm, rows, v, v).unwrap()).with_temperature(g.range(0.5, 2.0) as f32),
        ];
        let w = [g.range(0.1, 1.0) as f32, g.range(-1.0, 1.0) as f32];
        let wl = [w[0], w[0].abs() + 0.1];
        let cfg = if g.chance(0.5) { Config::linear(&wl) } else { Config::log_linear(&w) };
        let cfg = Config { out_temperature: g.range(0.5, 2.0) as f32, ..cfg };
        let s = params_gen(&mut g, v);
        let mut lp = vec![0.0f32; rows * v];
        combine(&models, &cfg, Output { log_probs: Some(RowsMut::new(&mut lp, rows, v, v).unwrap()), ..Default::default() }).unwrap();
        let (mut t1, mut t2) = (vec![0u32; rows], vec![0u32; rows]);
        let (mut l1, mut l2) = (vec![0f32; rows], vec![0f32; rows]);
        sample(Rows::new(&lp, rows, v, v).unwrap(), &s, Sampled { tokens: &mut t1, log_probs: Some(&mut l1) }).unwrap();
        let mut scratch = vec![0.0f32; v + 5];
        let r = combine_sample(&models, &cfg, &s, v, &mut scratch, Sampled { tokens: &mut t2, log_probs: Some(&mut l2) }).unwrap();
        prop_assert_eq!(&t1, &t2);
        prop_assert_eq!(l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), l2.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        prop_assert_eq!(r.masked_rows, t2.iter().filter(|&&t| t == NO_TOKEN).count());
    }
}

#[test]
fn gumbel_matches_f64_everywhere_that_matters() {
    // every 24-bit uniform near both ends, and a stride through the middle
    let mut worst = 0.0f64;
    let mut check = |r: u32| {
        let w = r << 8;
        let u = (r as f64 + 0.5) / 16_777_216.0;
        let want = -(-u.ln()).ln();
        let got = gumbel(w) as f64;
        assert!(got.is_finite());
        // absolute error (g is added to scores of magnitude >= 1)
        worst = worst.max((got - want).abs() / want.abs().max(1.0));
    };
    for r in 0..4096 {
        check(r);
        check((1 << 24) - 1 - r);
    }
    for r in (0..(1u32 << 24)).step_by(997) {
        check(r);
    }
    assert!(worst < 2e-6, "worst relative error {worst}");
    // the extremes: |g| < 18
    assert!(gumbel(u32::MAX) < 18.0 && gumbel(0) > -3.0);
}

#[test]
fn keys_preserve_order() {
    let xs = [
        f32::NEG_INFINITY,
        f32::MIN,
        -3.5,
        -1e-30,
        -0.0,
        0.0,
        1e-30,
        2.0,
        f32::MAX,
    ];
    for w in xs.windows(2) {
        assert!(score_key(w[0]) <= score_key(w[1]), "{} {}", w[0], w[1]);
    }
    assert_eq!(score_key(-0.0), score_key(0.0));
    for &x in &xs {
        assert_eq!(key_score(score_key(x)), x + 0.0);
    }
}

/// Frequencies over many steps against the truncated, renormalized
/// distribution (each within 5 standard deviations).
#[test]
fn frequencies_match_the_truncated_distribution() {
    let row = [0.0f32, -0.5, -1.0, -1.0, -2.0, -3.0, f32::NEG_INFINITY, -4.0];
    let cases = [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (1.0, 3, 1.0, 0.0), // ties at the cut: 4 kept
        (1.0, 0, 0.8, 0.0),
        (1.5, 0, 1.0, 0.2),
        (1.0, 5, 0.9, 0.05),
    ];
    let n = 40_000u32;
    for &(t, k, p, mp) in &cases {
        let mut s = Sampling::new(t, 1234);
        s.top_k = k;
        s.top_p = p;
        s.min_p = mp;
        let kept = ref_kept(&row, &s);
        let w: Vec<f64> = row
            .iter()
            .zip(&kept)
            .map(|(&x, &k)| if k { ((x as f64) / t as f64).exp() } else { 0.0 })
            .collect();
        let z: f64 = w.iter().sum();
        let mut count = [0u32; 8];
        let mut tok = [0u32];
        for step in 0..n {
            s.step = step;
            sample(
                Rows::single(&row),
                &s,
                Sampled {
                    tokens: &mut tok,
                    log_probs: None,
                },
            )
            .unwrap();
            count[tok[0] as usize] += 1;
        }
        for v in 0..8 {
            let q = w[v] / z;
            let sd = (n as f64 * q * (1.0 - q)).sqrt().max(1.0);
            let dev = (count[v] as f64 - n as f64 * q).abs();
            assert!(
                dev <= 5.0 * sd,
                "case {:?} token {v}: {} vs {:.1}",
                (t, k, p, mp),
                count[v],
                n as f64 * q
            );
            if !kept[v] {
                assert_eq!(count[v], 0);
            }
        }
    }
}

#[test]
fn edge_rows_and_greedy() {
    let nan = [0.0f32, f32::NAN, 1.0];
    let inf = [0.0f32, f32::INFINITY];
    let masked = [f32::NEG_INFINITY; 3];
    let one = [f32::NEG_INFINITY, -7.0, f32::NEG_INFINITY];
    let tie = [1.0f32, 2.0, 2.0];
    let s = {
        let mut s = Sampling::new(0.9, 5);
        s.top_p = 0.3;
        s
    };
    for (row, want_tok, want_lp) in [
        (&nan[..], NO_TOKEN, f32::NAN),
        (&inf[..], NO_TOKEN, f32::NAN),
        (&masked[..], NO_TOKEN, f32::NEG_INFINITY),
        (&one[..], 1, -7.0),
    ] {
        let (mut t, mut l) = ([0u32], [0f32]);
        let rep = sample(
            Rows::single(row),
            &s,
            Sampled {
                tokens: &mut t,
                log_probs: Some(&mut l),
            },
        )
        .unwrap();
        assert_eq!(t[0], want_tok);
        assert_eq!(l[0].to_bits(), want_lp.to_bits());
        assert_eq!(rep.is_clean(), want_tok != NO_TOKEN);
    }
    // greedy: the lowest index among ties, filters ignored
    let mut g = Sampling::greedy();
    g.top_k = 1;
    g.top_p = 0.01;
    let mut t = [9u32];
    sample(
        Rows::single(&tie),
        &g,
        Sampled {
            tokens: &mut t,
            log_probs: None,
        },
    )
    .unwrap();
    assert_eq!(t[0], 1);
    // top-k 1 at any temperature is greedy up to ties (both tied tokens kept)
    let mut k1 = Sampling::new(2.0, 77);
    k1.top_k = 1;
    for step in 0..64 {
        k1.step = step;
        sample(
            Rows::single(&tie),
            &k1,
            Sampled {
                tokens: &mut t,
                log_probs: None,
            },
        )
        .unwrap();
        assert!(t[0] == 1 || t[0] == 2);
    }
    // an empty row is masked
    let empty: [f32; 0] = [];
    let rep = sample(
        Rows::new(&empty, 1, 0, 0).unwrap(),
        &s,
        Sampled {
            tokens: &mut t,
            log_probs: None,
        },
    )
    .unwrap();
    assert_eq!((t[0], rep.masked_rows), (NO_TOKEN, 1));
}

#[test]
fn errors_name_the_argument_and_write_nothing() {
    let row = [0.0f32, 1.0];
    let bad = |f: fn(&mut Sampling)| {
        let mut s = Sampling::new(1.0, 0);
        f(&mut s);
        s
    };
    let cases: [(Sampling, Error); 7] = [
        (
            bad(|s| s.temperature = f32::NAN),
            Error::NonFinite {
                arg: "sampling.temperature",
                index: 0,
            },
        ),
        (
            bad(|s| s.temperature = -1.0),
            Error::OutOfRange {
                arg: "sampling.temperature",
                index: 0,
            },
        ),
        (
            bad(|s| s.temperature = 1e-40),
            Error::OutOfRange {
                arg: "sampling.temperature",
                index: 0,
            },
        ),
        (
            bad(|s| s.top_p = 0.0),
            Error::OutOfRange {
                arg: "sampling.top_p",
                index: 0,
            },
        ),
        (
            bad(|s| s.top_p = 1.5),
            Error::OutOfRange {
                arg: "sampling.top_p",
                index: 0,
            },
        ),
        (
            bad(|s| s.min_p = f32::NAN),
            Error::NonFinite {
                arg: "sampling.min_p",
                index: 0,
            },
        ),
        (
            bad(|s| s.min_p = -0.1),
            Error::OutOfRange {
                arg: "sampling.min_p",
                index: 0,
            },
        ),
    ];
    for (s, e) in cases {
        let mut t = [5u32];
        assert_eq!(
            sample(
                Rows::single(&row),
                &s,
                Sampled {
                    tokens: &mut t,
                    log_probs: None
                }
            )
            .unwrap_err(),
            e
        );
        assert_eq!(t[0], 5);
    }
    let s = Sampling::new(1.0, 0);
    let mut t = [5u32, 5];
    let e = sample(
        Rows::single(&row),
        &s,
        Sampled {
            tokens: &mut t,
            log_probs: None,
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { arg: "tokens", .. }));
    let mut t = [5u32];
    let mut l = [5f32; 2];
    let e = sample(
        Rows::single(&row),
        &s,
        Sampled {
            tokens: &mut t,
            log_probs: Some(&mut l),
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { arg: "log_probs", .. }));
    assert_eq!((t[0], l[0]), (5, 5.0));
    // combine_sample: scratch too short, combine's own errors
    let models = [Model::new(Rows::single(&row))];
    let mut scratch = [0f32; 1];
    let e = combine_sample(
        &models,
        &Config::linear(&[1.0]),
        &s,
        2,
        &mut scratch,
        Sampled {
            tokens: &mut t,
            log_probs: None,
        },
    )
    .unwrap_err();
    assert_eq!(
        e,
        Error::BufferTooShort {
            arg: "scratch",
            needed: 2,
            got: 1
        }
    );
    let mut scratch = [0f32; 2];
    let e = combine_sample(
        &models,
        &Config::linear(&[-1.0]),
        &s,
        2,
        &mut scratch,
        Sampled {
            tokens: &mut t,
            log_probs: None,
        },
    )
    .unwrap_err();
    assert_eq!(
        e,
        Error::OutOfRange {
            arg: "weights",
            index: 0
        }
    );
    assert_eq!(t[0], 5);
}
