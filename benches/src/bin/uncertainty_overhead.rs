//! The cost of the per-row uncertainty outputs of `ensemble::combine` on
//! the CPU, measured so that a noisy machine cannot bias the ratio: plain
//! and uncertainty calls alternate, round after round, on the same inputs,
//! and each round gives one ratio; the table reports medians (and the
//! spread of the ratios) over the rounds.
//!
//! Run: `cargo run --release -p medley-benches --bin uncertainty_overhead [ROUNDS]`

use medley_benches::random_f32;
use medley_core::bf16;
use medley_core::ensemble::{Config, Model, Output, combine};
use medley_core::{Rows, RowsMut};
use std::hint::black_box;
use std::time::Instant;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    medley_benches::simd_level_from_env();
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(31);
    println!(
        "rounds: {rounds} (each: one plain call, one call with the uncertainty outputs, alternating first)\n"
    );
    println!(
        "| M | B | V | mode | plain (ms) | with uncertainty (ms) | ratio (median) | ratio (25%-75%) | target <= 1.10 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &(m, b, v) in &[
        (2usize, 64usize, 32_000usize),
        (2, 64, 128_256),
        (8, 64, 32_000),
        (4, 8, 128_256),
    ] {
        let n = m * b * v;
        let data: Vec<bf16> = random_f32(7, n, 8.0).iter().map(|&x| bf16::from_f32(x)).collect();
        let models: Vec<Model<'_>> = (0..m)
            .map(|i| Model::new(Rows::dense(&data[i * b * v..(i + 1) * b * v], b, v).unwrap()))
            .collect();
        let weights: Vec<f32> = (0..m).map(|i| 1.0 + i as f32).collect();
        let coefs: Vec<f32> = (0..m).map(|i| if i == m - 1 { -0.5 } else { 1.0 }).collect();
        let mut out = vec![0.0f32; b * v];
        let [mut h, mut t1, mut mg, mut js] = [(); 4].map(|_| vec![0.0f32; b]);
        for (mode, cfg) in [
            ("linear", Config::linear(&weights)),
            ("loglinear", Config::log_linear(&coefs)),
        ] {
            let linear = mode == "linear";
            let mut run = |with: bool| -> f64 {
                let mut o = Output {
                    log_probs: Some(RowsMut::dense(&mut out, b, v).unwrap()),
                    ..Default::default()
                };
                if with {
                    o.entropy = Some(&mut h);
                    o.top1_prob = Some(&mut t1);
                    o.margin = Some(&mut mg);
                    o.disagreement = linear.then_some(&mut js[..]);
                }
                let t = Instant::now();
                black_box(combine(black_box(&models), &cfg, o).unwrap());
                t.elapsed().as_secs_f64() * 1e3
            };
            run(false);
            run(true);
            let (mut tp, mut tu, mut r) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..rounds {
                let (p, u) = if i % 2 == 0 {
                    let p = run(false);
                    (p, run(true))
                } else {
                    let u = run(true);
                    (run(false), u)
                };
                tp.push(p);
                tu.push(u);
                r.push(u / p);
            }
            let (mp, mu) = (median(&mut tp), median(&mut tu));
            let mr = median(&mut r);
            let (q1, q3) = (r[rounds / 4], r[3 * rounds / 4]);
            println!(
                "| {m} | {b} | {v} | {mode} | {mp:.3} | {mu:.3} | {mr:.3} | {q1:.3}-{q3:.3} | {} |",
                if mr <= 1.10 { "met" } else { "not met" }
            );
        }
    }
}
