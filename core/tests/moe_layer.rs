#![allow(clippy::needless_range_loop)]
//! The CPU reference MoE layer against a dense per-token f64 computation,
//! plus determinism, batch invariance, expert parallelism and the
//! zero-weight rule.

mod moe_util;

use medley_core::moe::layer::{Experts, Plan, Routing, layer_scratch_len, moe_layer};
use medley_core::moe::plan::sort_by_expert;
use medley_core::moe::{ExpertRange, NO_EXPERT};
use medley_core::{Element, Error, Report, Rows, RowsMut, bf16, f16};
use moe_util::{Dt, Gen, silu64};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    t: usize,
    e: usize,
    k: usize,
    h: usize,
    i: usize,
    x_stride: usize,
    x: Vec<f32>,
    /// All E experts' weights, [E, 2I, H] and [E, H, I].
    w13: Vec<f32>,
    w2: Vec<f32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    xdt: Dt,
    wdt: Dt,
}

impl Case {
    fn make(seed: u64) -> Case {
        let mut g = Gen(seed);
        let e = 1 + g.below(6);
        let k = 1 + g.below(e);
        let t_max = if g.chance(0.3) { 48 } else { 6 };
        let t = g.below(t_max);
        let h_max = if g.chance(0.3) { 80 } else { 20 };
        let h = 1 + g.below(h_max);
        let i = 1 + g.below(24);
        let x_stride = h + g.below(3);
        let (xdt, wdt) = (Dt::pick(&mut g), Dt::pick(&mut g));
        let x = (0..t * x_stride)
            .map(|_| xdt.round(g.range(-1.0, 1.0) as f32))
            .collect();
        let ws = 1.0 / (h as f64).sqrt();
        let w13 = (0..e * 2 * i * h)
            .map(|_| wdt.round(g.range(-ws, ws) as f32))
            .collect();
        let ws2 = 1.0 / (i as f64).sqrt();
        let w2 = (0..e * h * i)
            .map(|_| wdt.round(g.range(-ws2, ws2) as f32))
            .collect();
        let mut ids = Vec::with_capacity(t * k);
        let mut weights = Vec::with_capacity(t * k);
        for _ in 0..t {
            let mut perm: Vec<u32> = (0..e as u32).collect();
            for a in (1..e).rev() {
                perm.swap(a, g.below(a + 1));
            }
            for j in 0..k {
                ids.push(if g.chance(0.05) { NO_EXPERT } else { perm[j] });
                weights.push(if g.chance(0.1) {
                    0.0
                } else {
                    g.range(0.0, 1.0) as f32
                });
            }
        }
        Case {
            t,
            e,
            k,
            h,
            i,
            x_stride,
            x,
            w13,
            w2,
            ids,
            weights,
            xdt,
            wdt,
        }
    }

    /// Dense per-token reference in f64 over the experts of `range`, with a
    /// magnitude bound for the tolerance.
    fn reference(&self, range: ExpertRange) -> (Vec<f64>, Vec<f64>) {
        let (h, i, k) = (self.h, self.i, self.k);
        let mut out = vec![0.0; self.t * h];
        let mut mag = vec![0.0; self.t * h];
        for tok in 0..self.t {
            let x = &self.x[tok * self.x_stride..tok * self.x_stride + h];
            for j in 0..k {
                let (id, w) = (self.ids[tok * k + j], self.weights[tok * k + j] as f64);
                if id == NO_EXPERT || range.local(id).is_none() || w == 0.0 {
                    continue;
                }
                let e = id as usize;
                let w13 = &self.w13[e * 2 * i * h..(e + 1) * 2 * i * h];
                let w2 = &self.w2[e * h * i..(e + 1) * h * i];
                let mut a = vec![0.0; i];
                let mut am = vec![0.0; i];
                for q in 0..i {
                    let (mut gq, mut uq, mut gm, mut um) = (0.0, 0.0, 0.0, 0.0);
                    for c in 0..h {
                        gq += w13[q * h + c] as f64 * x[c] as f64;
                        uq += w13[(i + q) * h + c] as f64 * x[c] as f64;
                        gm += (w13[q * h + c] as f64 * x[c] as f64).abs();
                        um += (w13[(i + q) * h + c] as f64 * x[c] as f64).abs();
                    }
                    a[q] = silu64(gq) * uq;
                    am[q] = (gm + 1.0) * (um + 1.0);
                }
                for c in 0..h {
                    let (mut y, mut ym) = (0.0, 0.0);
                    for q in 0..i {
                        y += w2[c * i + q] as f64 * a[q];
                        ym += (w2[c * i + q] as f64).abs() * am[q];
                    }
                    out[tok * h + c] += w * y;
                    mag[tok * h + c] += w.abs() * ym;
                }
            }
        }
        (out, mag)
    }

    /// Runs the layer with the case's element types for rows `rows` and the
    /// local experts `range`, output type `O`.
    fn run<O: Element>(&self, range: ExpertRange, rows: std::ops::Range<usize>) -> (Vec<O>, Report) {
        match (self.xdt, self.wdt) {
            (Dt::F32, Dt::F32) => self.run_typed::<f32, f32, O>(range, rows),
            (Dt::F32, Dt::F16) => self.run_typed::<f32, f16, O>(range, rows),
            (Dt::F32, Dt::Bf16) => self.run_typed::<f32, bf16, O>(range, rows),
            (Dt::F16, Dt::F32) => self.run_typed::<f16, f32, O>(range, rows),
            (Dt::F16, Dt::F16) => self.run_typed::<f16, f16, O>(range, rows),
            (Dt::F16, Dt::Bf16) => self.run_typed::<f16, bf16, O>(range, rows),
            (Dt::Bf16, Dt::F32) => self.run_typed::<bf16, f32, O>(range, rows),
            (Dt::Bf16, Dt::F16) => self.run_typed::<bf16, f16, O>(range, rows),
            (Dt::Bf16, Dt::Bf16) => self.run_typed::<bf16, bf16, O>(range, rows),
        }
    }

    fn run_typed<A: Element, W: Element, O: Element>(
        &self,
        range: ExpertRange,
        rows: std::ops::Range<usize>,
    ) -> (Vec<O>, Report) {
        let (h, i, k) = (self.h, self.i, self.k);
        let t = rows.len();
        let x: Vec<A> = self.x[rows.start * self.x_stride..rows.end * self.x_stride]
            .iter()
            .map(|&v| A::from_f32(v))
            .collect();
        let (f, l) = (range.first as usize, range.len());
        let w13: Vec<W> = self.w13[f * 2 * i * h..(f + l) * 2 * i * h]
            .iter()
            .map(|&v| W::from_f32(v))
            .collect();
        let w2: Vec<W> = self.w2[f * h * i..(f + l) * h * i]
            .iter()
            .map(|&v| W::from_f32(v))
            .collect();
        let ids = &self.ids[rows.start * k..rows.end * k];
        let weights = &self.weights[rows.start * k..rows.end * k];
        let mut sorted = vec![0u32; t * k];
        let mut offsets = vec![0u64; l + 1];
        sort_by_expert(ids, self.e, range, &mut sorted, &mut offsets, None).unwrap();
        let mut scratch = vec![f32::NAN; layer_scratch_len(t, k, h, i).unwrap()];
        let mut out = vec![O::from_f32(12345.0); t * h];
        let rep = moe_layer(
            Rows::new(&x[..], t, h, self.x_stride).unwrap(),
            &Experts {
                w13: &w13,
                w2: &w2,
                hidden: h,
                inter: i,
                range,
            },
            &Routing {
                ids,
                weights,
                k,
                experts: self.e,
            },
            &Plan {
                sorted: &sorted,
                offsets: &offsets,
            },
            &mut scratch,
            RowsMut::dense(&mut out, t, h).unwrap(),
        )
        .unwrap();
        (out, rep)
    }

    fn random_range(&self, g: &mut Gen) -> ExpertRange {
        let a = g.below(self.e + 1);
        let b = a + g.below(self.e + 1 - a);
        ExpertRange {
            first: a as u32,
            last: b as u32,
        }
    }
}

#[track_caller]
fn assert_matches(got: &[f32], want: &[f64], mag: &[f64]) {
    for n in 0..want.len() {
        let tol = 2e-6 * mag[n] + 1e-30;
        assert!(
            (got[n] as f64 - want[n]).abs() <= tol,
            "element {n}: got {}, want {} (tol {tol})",
            got[n],
            want[n]
        );
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn layer_equals_dense_per_token_reference(seed in any::<u64>()) {
        let c = Case::make(seed);
        let mut g = Gen(seed ^ 1);
        let range = if g.chance(0.5) { ExpertRange::all(c.e) } else { c.random_range(&mut g) };
        let (got, rep) = c.run::<f32>(range, 0..c.t);
        let (want, mag) = c.reference(range);
        assert_matches(&got, &want, &mag);
        prop_assert_eq!(rep.nan_rows, 0);
        let empty = (0..c.t).filter(|&tok| (0..c.k).all(|j| {
            let s = tok * c.k + j;
            range.local(c.ids[s]).is_none() || c.weights[s] == 0.0
        })).count();
        prop_assert_eq!(rep.masked_rows, empty);
    }

    #[test]
    fn batch_invariant_and_expert_parallel(seed in any::<u64>()) {
        let c = Case::make(seed);
        let mut g = Gen(seed ^ 2);
        let all = ExpertRange::all(c.e);
        let (full, _) = c.run::<f32>(all, 0..c.t);
        // Any split of the batch gives the same bits.
        if c.t >= 2 {
            let a = 1 + g.below(c.t - 1);
            let (p0, _) = c.run::<f32>(all, 0..a);
            let (p1, _) = c.run::<f32>(all, a..c.t);
            prop_assert_eq!(bits(&full[..a * c.h]), bits(&p0));
            prop_assert_eq!(bits(&full[a * c.h..]), bits(&p1));
        }
        // Two ranks add up to the full layer.
        let s = g.below(c.e + 1) as u32;
        let (r0, _) = c.run::<f32>(ExpertRange { first: 0, last: s }, 0..c.t);
        let (r1, _) = c.run::<f32>(ExpertRange { first: s, last: c.e as u32 }, 0..c.t);
        let (_, mag) = c.reference(all);
        let sum: Vec<f64> = r0.iter().zip(&r1).map(|(&a, &b)| a as f64 + b as f64).collect();
        assert_matches(&full, &sum, &mag);
        // bf16 output is the f32 output rounded once.
        let (ob, _) = c.run::<bf16>(all, 0..c.t);
        prop_assert_eq!(ob, full.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
    }

    #[test]
    fn zero_weight_contributes_exactly_zero(seed in any::<u64>()) {
        let mut c = Case::make(seed);
        if c.t == 0 {
            return Ok(());
        }
        let mut g = Gen(seed ^ 3);
        let x = g.below(c.e) as u32;
        // Expert x's weights are poison; every slot routed to x has weight 0.
        let mut dropped = c.clone();
        for s in 0..c.ids.len() {
            if c.ids[s] == x {
                c.weights[s] = 0.0;
                dropped.ids[s] = NO_EXPERT;
            }
        }
        let (h, i) = (c.h, c.i);
        c.w13[x as usize * 2 * i * h..(x as usize + 1) * 2 * i * h].fill(f32::NAN);
        c.w2[x as usize * h * i..(x as usize + 1) * h * i].fill(f32::INFINITY);
        let all = ExpertRange::all(c.e);
        let (a, rep) = c.run::<f32>(all, 0..c.t);
        let (b, _) = dropped.run::<f32>(all, 0..c.t);
        prop_assert_eq!(rep.nan_rows, 0);
        prop_assert_eq!(bits(&a), bits(&b));
    }
}

#[test]
fn one_token_many_rows_per_expert_and_empty_batch() {
    // T = 1, k = E = 3.
    let mut c = Case::make(5);
    c.t = 1;
    c.e = 3;
    c.k = 3;
    c.h = 37;
    c.i = 11;
    c.x_stride = 37;
    c.xdt = Dt::Bf16;
    c.wdt = Dt::Bf16;
    let mut g = Gen(9);
    c.x = (0..37)
        .map(|_| Dt::Bf16.round(g.range(-1.0, 1.0) as f32))
        .collect();
    c.w13 = (0..3 * 2 * 11 * 37)
        .map(|_| Dt::Bf16.round(g.range(-0.2, 0.2) as f32))
        .collect();
    c.w2 = (0..3 * 37 * 11)
        .map(|_| Dt::Bf16.round(g.range(-0.3, 0.3) as f32))
        .collect();
    c.ids = vec![2, 0, 1];
    c.weights = vec![0.5, 0.3, 0.2];
    let (got, rep) = c.run::<f32>(ExpertRange::all(3), 0..1);
    assert!(rep.is_clean());
    let (want, mag) = c.reference(ExpertRange::all(3));
    assert_matches(&got, &want, &mag);
    // Many tokens on one expert: several blocks of 16 rows.
    let mut c2 = c.clone();
    c2.t = 50;
    c2.k = 1;
    c2.x = (0..50 * 37)
        .map(|_| Dt::Bf16.round(g.range(-1.0, 1.0) as f32))
        .collect();
    c2.ids = vec![1; 50];
    c2.weights = (0..50).map(|v| v as f32 / 50.0).collect();
    let (got, rep) = c2.run::<f32>(ExpertRange::all(3), 0..50);
    assert_eq!(rep.masked_rows, 1); // token 0 has weight 0
    let (want, mag) = c2.reference(ExpertRange::all(3));
    assert_matches(&got, &want, &mag);
    // T = 0.
    let (got, rep) = c2.run::<f32>(ExpertRange::all(3), 0..0);
    assert!(got.is_empty() && rep.is_clean());
}

#[test]
fn nan_routing_weight_gives_a_flagged_nan_row() {
    let mut c = Case::make(77);
    while c.t < 2 {
        c = Case::make(c.t as u64 + 1000);
    }
    c.ids[0] = 0;
    c.weights[0] = f32::NAN;
    let (got, rep) = c.run::<f32>(ExpertRange::all(c.e), 0..c.t);
    assert!(got[..c.h].iter().all(|v| v.is_nan()));
    assert_eq!(rep.nan_rows, 1);
}

#[test]
fn errors_are_checked_before_writing() {
    let (t, h, i, e, k) = (2usize, 4usize, 3usize, 3usize, 2usize);
    let x = vec![0.5f32; t * h];
    let w13 = vec![0.1f32; e * 2 * i * h];
    let w2 = vec![0.1f32; e * h * i];
    let ids = [0u32, 2, 1, 2];
    let weights = [0.5f32; 4];
    let mut sorted = vec![0u32; t * k];
    let mut offsets = vec![0u64; e + 1];
    let all = ExpertRange::all(e);
    sort_by_expert(&ids, e, all, &mut sorted, &mut offsets, None).unwrap();
    let need = layer_scratch_len(t, k, h, i).unwrap();
    let mut scratch = vec![0.0f32; need];
    let mut out = vec![7.0f32; t * h];
    let experts = Experts {
        w13: &w13,
        w2: &w2,
        hidden: h,
        inter: i,
        range: all,
    };
    let routing = Routing {
        ids: &ids,
        weights: &weights,
        k,
        experts: e,
    };
    let xr = Rows::dense(&x, t, h).unwrap();
    let mut call =
        |experts: &Experts<'_, f32>, routing: &Routing<'_>, plan: &Plan<'_>, scratch: &mut [f32]| {
            moe_layer(
                xr,
                experts,
                routing,
                plan,
                scratch,
                RowsMut::dense(&mut out, t, h).unwrap(),
            )
            .unwrap_err()
        };
    let good = Plan {
        sorted: &sorted,
        offsets: &offsets,
    };
    assert!(matches!(
        call(&experts, &routing, &good, &mut scratch[..need - 1]),
        Error::BufferTooShort { arg: "scratch", .. }
    ));
    // A plan that lists a slot under the wrong expert.
    let mut bad_sorted = sorted.clone();
    bad_sorted.swap(0, 1);
    assert!(matches!(
        call(
            &experts,
            &routing,
            &Plan {
                sorted: &bad_sorted,
                offsets: &offsets
            },
            &mut scratch
        ),
        Error::OutOfRange {
            arg: "plan.sorted",
            ..
        }
    ));
    // A plan that misses a slot.
    let short = [0u64, 1, 2, 3];
    assert!(matches!(
        call(
            &experts,
            &routing,
            &Plan {
                sorted: &sorted,
                offsets: &short
            },
            &mut scratch
        ),
        Error::OutOfRange {
            arg: "plan.offsets",
            ..
        }
    ));
    assert!(matches!(
        call(
            &Experts {
                w2: &w2[1..],
                ..experts
            },
            &routing,
            &good,
            &mut scratch
        ),
        Error::LengthMismatch { arg: "w2", .. }
    ));
    assert!(matches!(
        call(
            &experts,
            &Routing {
                ids: &[0, 3, 1, 2],
                ..routing
            },
            &good,
            &mut scratch
        ),
        Error::IndexOutOfBounds {
            arg: "ids",
            index: 3,
            bound: 3
        }
    ));
    assert!(matches!(
        call(&Experts { hidden: 5, ..experts }, &routing, &good, &mut scratch),
        Error::LengthMismatch { arg: "x.len", .. }
    ));
    assert!(matches!(
        call(&experts, &Routing { k: 0, ..routing }, &good, &mut scratch),
        Error::OutOfRange { arg: "routing.k", .. }
    ));
    assert!(out.iter().all(|&v| v == 7.0));
}
