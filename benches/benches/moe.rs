//! MoE routing on one core: gating (tokens per second against a memcpy of
//! the logits), planning (T = 4096, k = 8, E = 256) and the CPU reference
//! layer (useful FLOP/s).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use medley_benches::{memcpy_ceiling, random_f32};
use medley_core::moe::ExpertRange;
use medley_core::moe::capacity::{Priority, apply_capacity, capacity};
use medley_core::moe::gating::{GroupedConfig, Noise, grouped_topk, noisy_topk, topk_softmax};
use medley_core::moe::layer::{Experts, Plan, Routing, layer_scratch_len, moe_layer};
use medley_core::moe::plan::{align_block_size, block_padded_len, sort_by_expert};
use medley_core::{Rows, RowsMut, bf16};
use std::hint::black_box;
use std::time::Duration;

fn short(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(700));
}

fn gating(c: &mut Criterion) {
    for &t in &[1usize, 64, 4096] {
        for &e in &[8usize, 64, 256] {
            let mut group = c.benchmark_group(format!("moe_gating/T{t}_E{e}"));
            short(&mut group);
            memcpy_ceiling(&mut group, t * e * 4, t as u64);
            let x = random_f32(11, t * e, 4.0);
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            group.throughput(Throughput::Elements(t as u64));
            for &k in &[2usize, 8] {
                if k > e {
                    continue;
                }
                let mut ids = vec![0u32; t * k];
                let mut w = vec![0.0f32; t * k];
                group.bench_function(BenchmarkId::new("topk_softmax_f32", k), |b| {
                    b.iter(|| {
                        topk_softmax(
                            Rows::dense(black_box(&x), t, e).unwrap(),
                            k,
                            true,
                            &mut ids,
                            &mut w,
                        )
                        .unwrap()
                    })
                });
                group.bench_function(BenchmarkId::new("topk_softmax_f32_no_renorm", k), |b| {
                    b.iter(|| {
                        topk_softmax(
                            Rows::dense(black_box(&x), t, e).unwrap(),
                            k,
                            false,
                            &mut ids,
                            &mut w,
                        )
                        .unwrap()
                    })
                });
                group.bench_function(BenchmarkId::new("topk_softmax_bf16", k), |b| {
                    b.iter(|| {
                        topk_softmax(
                            Rows::dense(black_box(&xb), t, e).unwrap(),
                            k,
                            true,
                            &mut ids,
                            &mut w,
                        )
                        .unwrap()
                    })
                });
                if e == 256 && k == 8 {
                    let bias = random_f32(12, e, 0.1);
                    let cfg = GroupedConfig::deepseek_v3(&bias);
                    group.bench_function(BenchmarkId::new("grouped_deepseek_v3", k), |b| {
                        b.iter(|| {
                            grouped_topk(Rows::dense(black_box(&x), t, e).unwrap(), &cfg, &mut ids, &mut w)
                        })
                    });
                }
                if e == 64 && k == 2 {
                    let n = random_f32(13, t * e, 2.0);
                    let noise = Noise {
                        seed: 1,
                        layer: 0,
                        token_offset: 0,
                    };
                    group.bench_function(BenchmarkId::new("noisy_topk", k), |b| {
                        b.iter(|| {
                            noisy_topk(
                                Rows::dense(black_box(&x), t, e).unwrap(),
                                Rows::dense(&n, t, e).unwrap(),
                                k,
                                noise,
                                &mut ids,
                                &mut w,
                            )
                        })
                    });
                }
            }
            group.finish();
        }
    }
}

fn planning(c: &mut Criterion) {
    let (t, k, e) = (4096usize, 8usize, 256usize);
    let x = random_f32(21, t * e, 4.0);
    let mut ids = vec![0u32; t * k];
    let mut w = vec![0.0f32; t * k];
    topk_softmax(Rows::dense(&x, t, e).unwrap(), k, true, &mut ids, &mut w).unwrap();
    let n = t * k;
    let mut group = c.benchmark_group(format!("moe_plan/T{t}_k{k}_E{e}"));
    short(&mut group);
    memcpy_ceiling(&mut group, n * 4, n as u64);
    group.throughput(Throughput::Elements(n as u64));
    let mut sorted = vec![0u32; n];
    let mut offsets = vec![0u64; e + 1];
    let mut inv = vec![0u32; n];
    group.bench_function("sort_by_expert", |b| {
        b.iter(|| {
            sort_by_expert(
                black_box(&ids),
                e,
                ExpertRange::all(e),
                &mut sorted,
                &mut offsets,
                None,
            )
        })
    });
    group.bench_function("sort_by_expert+inverse", |b| {
        b.iter(|| {
            sort_by_expert(
                black_box(&ids),
                e,
                ExpertRange::all(e),
                &mut sorted,
                &mut offsets,
                Some(&mut inv),
            )
        })
    });
    group.bench_function("sort_by_expert_ep8_rank3", |b| {
        let r = ExpertRange { first: 96, last: 128 };
        let mut off = vec![0u64; 33];
        b.iter(|| sort_by_expert(black_box(&ids), e, r, &mut sorted, &mut off, Some(&mut inv)))
    });
    for bm in [16usize, 64] {
        let (len, blocks) = block_padded_len(n, e, bm).unwrap();
        let mut s = vec![0u32; len];
        let mut be = vec![0u32; blocks];
        group.bench_function(BenchmarkId::new("align_block_size", bm), |b| {
            b.iter(|| {
                align_block_size(
                    black_box(&ids),
                    e,
                    ExpertRange::all(e),
                    bm,
                    &mut s,
                    &mut be,
                    &mut offsets,
                    None,
                )
            })
        });
    }
    let cap = capacity(1.25, t, k, e).unwrap();
    let mut pos = vec![0u32; n];
    let mut counts = vec![0u32; e];
    let mut kept = vec![0u32; n];
    group.bench_function("apply_capacity_1.25", |b| {
        b.iter(|| {
            apply_capacity(
                black_box(&ids),
                k,
                e,
                cap,
                Priority::TokenOrder,
                &mut pos,
                &mut counts,
                Some(&mut kept),
            )
        })
    });
    group.finish();
}

fn layer(c: &mut Criterion) {
    // (T, E, k, H, I): a Mixtral-like coarse shape and a fine-grained one, small.
    for &(t, e, k, h, i) in &[
        (64usize, 8usize, 2usize, 512usize, 1024usize),
        (64, 64, 8, 256, 128),
    ] {
        let flops = 2 * t * k * 3 * h * i;
        let mut group = c.benchmark_group(format!("moe_layer/T{t}_E{e}_k{k}_H{h}_I{i}"));
        short(&mut group);
        group.throughput(Throughput::Elements(flops as u64));
        let logits = random_f32(31, t * e, 3.0);
        let mut ids = vec![0u32; t * k];
        let mut w = vec![0.0f32; t * k];
        topk_softmax(Rows::dense(&logits, t, e).unwrap(), k, true, &mut ids, &mut w).unwrap();
        let mut sorted = vec![0u32; t * k];
        let mut offsets = vec![0u64; e + 1];
        sort_by_expert(&ids, e, ExpertRange::all(e), &mut sorted, &mut offsets, None).unwrap();
        let x = random_f32(32, t * h, 1.0);
        let w13 = random_f32(33, e * 2 * i * h, 0.05);
        let w2 = random_f32(34, e * h * i, 0.05);
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let w13b: Vec<bf16> = w13.iter().map(|&v| bf16::from_f32(v)).collect();
        let w2b: Vec<bf16> = w2.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut scratch = vec![0.0f32; layer_scratch_len(t, k, h, i).unwrap()];
        let mut out = vec![0.0f32; t * h];
        let routing = Routing {
            ids: &ids,
            weights: &w,
            k,
            experts: e,
        };
        let plan = Plan {
            sorted: &sorted,
            offsets: &offsets,
        };
        let ef = Experts {
            w13: &w13,
            w2: &w2,
            hidden: h,
            inter: i,
            range: ExpertRange::all(e),
        };
        let eb = Experts {
            w13: &w13b,
            w2: &w2b,
            hidden: h,
            inter: i,
            range: ExpertRange::all(e),
        };
        group.bench_function("f32", |b| {
            b.iter(|| {
                moe_layer(
                    Rows::dense(black_box(&x), t, h).unwrap(),
                    &ef,
                    &routing,
                    &plan,
                    &mut scratch,
                    RowsMut::dense(&mut out, t, h).unwrap(),
                )
                .unwrap()
            })
        });
        group.bench_function("bf16", |b| {
            b.iter(|| {
                moe_layer(
                    Rows::dense(black_box(&xb), t, h).unwrap(),
                    &eb,
                    &routing,
                    &plan,
                    &mut scratch,
                    RowsMut::dense(&mut out, t, h).unwrap(),
                )
                .unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, gating, planning, layer);
