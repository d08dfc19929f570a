//! Ensemble combination on one core: input logits per second against a
//! memcpy of the same input bytes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use medley_benches::{memcpy_ceiling, random_f32};
use medley_core::bf16;
use medley_core::ensemble::{Config, Logits, Model, Output, combine};
use medley_core::{Rows, RowsMut};
use std::hint::black_box;
use std::time::Duration;

fn ensemble(c: &mut Criterion) {
    medley_benches::simd_level_from_env();
    for &v in &[32_000usize, 128_256] {
        for &b in &[1usize, 64] {
            for &m in &[2usize, 4, 8] {
                // Inputs only for a group the command line's filter selects.
                let g = format!("ensemble/M{m}_B{b}_V{v}");
                let names = [
                    "memcpy",
                    "linear/f32",
                    "loglinear/f32",
                    "linear/bf16",
                    "loglinear/bf16",
                ];
                if !medley_benches::filter().any_in(&g, &names) {
                    continue;
                }
                let n = m * b * v;
                let mut group = c.benchmark_group(g);
                group
                    .sample_size(10)
                    .warm_up_time(Duration::from_millis(300))
                    .measurement_time(Duration::from_secs(1));
                memcpy_ceiling(&mut group, n * 4, n as u64);
                let data = random_f32(7, n, 8.0);
                let data_bf: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                let mut out = vec![0.0f32; b * v];
                let weights: Vec<f32> = (0..m).map(|i| 1.0 + i as f32).collect();
                let coefs: Vec<f32> = (0..m).map(|i| if i == m - 1 { -0.5 } else { 1.0 }).collect();
                group.throughput(Throughput::Elements(n as u64));
                for dtype in ["f32", "bf16"] {
                    let models: Vec<Model<'_>> = (0..m)
                        .map(|i| {
                            let logits: Logits<'_> = if dtype == "f32" {
                                Rows::dense(&data[i * b * v..(i + 1) * b * v], b, v)
                                    .unwrap()
                                    .into()
                            } else {
                                Rows::dense(&data_bf[i * b * v..(i + 1) * b * v], b, v)
                                    .unwrap()
                                    .into()
                            };
                            Model::new(logits)
                        })
                        .collect();
                    for (mode, cfg) in [
                        ("linear", Config::linear(&weights)),
                        ("loglinear", Config::log_linear(&coefs)),
                    ] {
                        group.bench_function(BenchmarkId::new(mode, dtype), |bch| {
                            bch.iter(|| {
                                let o = Output {
                                    log_probs: Some(RowsMut::dense(&mut out, b, v).unwrap()),
                                    ..Default::default()
                                };
                                black_box(combine(black_box(&models), &cfg, o).unwrap())
                            })
                        });
                    }
                }
                group.finish();
            }
        }
    }
}

/// The per-row uncertainty outputs (entropy, top-1, margin; disagreement in
/// linear mode) against the plain combination, same inputs, same run.
fn ensemble_uncertainty(c: &mut Criterion) {
    medley_benches::simd_level_from_env();
    for &(m, b, v) in &[(2usize, 64usize, 32_000usize), (2, 64, 128_256), (8, 64, 32_000)] {
        let g = format!("ensemble_uncertainty/M{m}_B{b}_V{v}");
        let names = [
            "linear/plain",
            "linear/uncertainty",
            "loglinear/plain",
            "loglinear/uncertainty",
        ];
        if !medley_benches::filter().any_in(&g, &names) {
            continue;
        }
        let n = m * b * v;
        let mut group = c.benchmark_group(g);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        group.throughput(Throughput::Elements(n as u64));
        let data = random_f32(7, n, 8.0);
        let data_bf: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut out = vec![0.0f32; b * v];
        let [mut h, mut t1, mut mg, mut js] = [(); 4].map(|_| vec![0.0f32; b]);
        let weights: Vec<f32> = (0..m).map(|i| 1.0 + i as f32).collect();
        let coefs: Vec<f32> = (0..m).map(|i| if i == m - 1 { -0.5 } else { 1.0 }).collect();
        let models: Vec<Model<'_>> = (0..m)
            .map(|i| Model::new(Rows::dense(&data_bf[i * b * v..(i + 1) * b * v], b, v).unwrap()))
            .collect();
        for (mode, cfg) in [
            ("linear", Config::linear(&weights)),
            ("loglinear", Config::log_linear(&coefs)),
        ] {
            let linear = mode == "linear";
            for with in [false, true] {
                let id = BenchmarkId::new(mode, if with { "uncertainty" } else { "plain" });
                group.bench_function(id, |bch| {
                    bch.iter(|| {
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
                        black_box(combine(black_box(&models), &cfg, o).unwrap())
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, ensemble, ensemble_uncertainty);
