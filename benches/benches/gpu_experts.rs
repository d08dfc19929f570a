//! The expert GEMMs on the GPU (`medley_cuda::experts`), timed with CUDA
//! events over back-to-back launches, at the shapes of the PyTorch
//! baselines (`benches/baselines/pytorch-baselines-h100.json`, "moe"):
//! Mixtral (H 4096, F 14336, E 8, k 2) and DeepSeek-V3 (H 7168, F 2048,
//! E 256, k 8) at T in {1, 16, 128, 1024, 4096}, bf16.
//!
//! Each benchmark is one "projection" of the baselines (`2 T k F H` FLOPs,
//! the throughput reported as elements = FLOPs): `gemm1_*` the fused
//! gate/up + SwiGLU GEMM with `2I = F`, `gemm2_*` the down projection with
//! `K = F`, for the configuration the tuning table picks per generation
//! (`MEDLEY_GEMM_TUNING`, else the built-in H100 table). `gemm1_wgmma`
//! includes the permute of `x` the wgmma generation needs. The weight
//! bytes each problem touches are written to
//! `target/criterion/cuda-experts-meta.json` for benches/tools/experts_report.py.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use medley_benches::experts::{Problem, SHAPES, TOKENS};
use medley_cuda::driver::Event;
use medley_cuda::experts::{Epilogue, GemmDtype, Generation, Tuning, bucket};
use medley_cuda::owned::Gpu;
use std::time::Duration;

/// The ids of one problem's group (selected by the command line's filter
/// before its weights are built).
fn problem_ids(name: &str, t: usize) -> impl Iterator<Item = String> + '_ {
    ["gemm1", "gemm2"].into_iter().flat_map(move |e| {
        ["mma", "wgmma"]
            .into_iter()
            .map(move |g| format!("cuda/experts/{name}_T{t}/{e}_{g}/bf16"))
    })
}

fn experts(c: &mut Criterion) {
    let selected = |name: &str, t: usize| medley_benches::filter().any(problem_ids(name, t));
    if !SHAPES.iter().any(|s| TOKENS.iter().any(|&t| selected(s.0, t))) {
        return;
    }
    let Some(gpu) = Gpu::open_or_skip("cuda/experts benchmarks") else {
        return;
    };
    let tuning = match Tuning::for_kernels(gpu.kernels()) {
        Ok(t) => {
            eprintln!(
                "cuda/experts: tuning table of {:?} on {:?}",
                t.device(),
                gpu.kernels().device_name()
            );
            t
        }
        Err(why) => {
            eprintln!("cuda/experts: bad tuning table: {why}");
            return;
        }
    };
    let mut meta = Vec::new();
    for shape in SHAPES {
        for &t in &TOKENS {
            if !selected(shape.0, t) {
                continue;
            }
            let p = match Problem::new(&gpu, shape, t) {
                Ok(p) => p,
                Err(why) => {
                    eprintln!("cuda/experts {} T={t}: setup failed: {why}", shape.0);
                    continue;
                }
            };
            meta.push(format!(
                "{{\"id\": \"{}_T{t}\", \"H\": {}, \"F\": {}, \"E\": {}, \"k\": {}, \"T\": {t}, \"touched\": {}, \"weight_bytes\": {}, \"flops\": {}}}",
                p.name, p.h, p.f, p.e, p.k, p.touched, p.weight_bytes(), p.flops()
            ));
            let b = bucket(t * p.k, p.e);
            let mut group = c.benchmark_group(format!("cuda/experts/{}_T{t}", p.name));
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(100))
                .measurement_time(Duration::from_millis(400))
                .throughput(Throughput::Elements(p.flops() as u64));
            for (epi, ename) in [(Epilogue::SwiGlu, "gemm1"), (Epilogue::Down, "gemm2")] {
                for (genr, gname) in [(Generation::Mma, "mma"), (Generation::Wgmma, "wgmma")] {
                    let Some(id) =
                        tuning.pick(gpu.kernels(), epi, GemmDtype::BF16, b, |g| g.generation == genr)
                    else {
                        continue;
                    };
                    let bm = id.config().bm as usize;
                    let permute = epi == Epilogue::SwiGlu && genr == Generation::Wgmma;
                    eprintln!(
                        "cuda/experts/{}_T{t} {ename}_{gname}: {}",
                        p.name,
                        id.config().name()
                    );
                    assert!(
                        problem_ids(p.name, t)
                            .any(|i| i == format!("cuda/experts/{}_T{t}/{ename}_{gname}/bf16", p.name))
                    );
                    group.bench_function(BenchmarkId::new(format!("{ename}_{gname}"), "bf16"), |bch| {
                        bch.iter_custom(|iters| {
                            let (start, end) = (Event::new().unwrap(), Event::new().unwrap());
                            // SAFETY: the Gpu's own stream is live.
                            unsafe { start.record(gpu.stream().raw()) }.unwrap();
                            for _ in 0..iters {
                                if permute {
                                    p.permute(&gpu, GemmDtype::BF16, bm).expect("permute");
                                }
                                p.launch(&gpu, id.index(), bm).expect("launch");
                            }
                            // SAFETY: as above.
                            unsafe { end.record(gpu.stream().raw()) }.unwrap();
                            end.synchronize().unwrap();
                            Duration::from_secs_f64(end.elapsed_ms(&start).unwrap() as f64 / 1e3)
                        })
                    });
                }
            }
            group.finish();
        }
    }
    let meta_text = format!("[\n{}\n]\n", meta.join(",\n"));
    if let Err(e) = std::fs::create_dir_all("target/criterion")
        .and_then(|()| std::fs::write("target/criterion/cuda-experts-meta.json", meta_text))
    {
        eprintln!("cuda/experts: could not write target/criterion/cuda-experts-meta.json: {e}");
    }
}

criterion_group!(benches, experts);
