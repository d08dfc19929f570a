//! The expert-GEMM tuning harness: on the GPU at hand, sweeps every loaded
//! configuration of `medley_cuda::experts::GEMMS` (tile shapes, pipeline
//! stages, warps; both generations) over the baseline MoE shapes (Mixtral
//! and DeepSeek-V3 at T in {1, 16, 128, 1024, 4096}), validates each one
//! against host f64 dot products before timing it (a configuration that
//! fails is reported and never chosen), and writes the best configuration
//! per (epilogue, dtype, bucket, generation) to the table medley-cuda reads
//! (`MEDLEY_GEMM_TUNING`; a table saved as `cuda/tuning/<gpu>.txt` and
//! listed in `BUILTIN_TABLES` of `cuda/src/experts.rs` becomes that device's
//! built-in table).
//!
//! Usage: `tune_experts [--out FILE] [--report FILE] [--dtype bf16|f16|both]`
//! (defaults: `medley-tuning.txt`, `tuning-report.md`, both).
//!
//! Cost per bucket: the sum over the bucket's problems of (time / fastest
//! time any configuration reached on that problem); a wgmma GEMM1's time
//! includes the permute of `x` it needs.

use medley_benches::experts::{Problem, SHAPES, TOKENS};
use medley_cuda::driver::Event;
use medley_cuda::experts::{BUCKETS, Epilogue, GEMMS, GemmDtype, GemmId, Generation, bucket};
use medley_cuda::owned::Gpu;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// (shape name, dtype, tokens, epilogue): one tuning problem.
type Key = (String, u8, usize, u8);

fn time_us(gpu: &Gpu, mut f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    f()?;
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let (a, b) = (
            Event::new().map_err(|e| format!("{e:?}"))?,
            Event::new().map_err(|e| format!("{e:?}"))?,
        );
        // SAFETY: the Gpu's own stream is live.
        unsafe { a.record(gpu.stream().raw()) }.map_err(|e| format!("{e:?}"))?;
        let n = 8;
        for _ in 0..n {
            f()?;
        }
        // SAFETY: as above.
        unsafe { b.record(gpu.stream().raw()) }.map_err(|e| format!("{e:?}"))?;
        b.synchronize().map_err(|e| format!("{e:?}"))?;
        best = best.min(b.elapsed_ms(&a).map_err(|e| format!("{e:?}"))? as f64 * 1e3 / n as f64);
    }
    Ok(best)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, def: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| def.to_string())
    };
    let out = opt("--out", "medley-tuning.txt");
    let report_path = opt("--report", "tuning-report.md");
    let dtypes: Vec<GemmDtype> = match opt("--dtype", "both").as_str() {
        "bf16" => vec![GemmDtype::BF16],
        "f16" => vec![GemmDtype::F16],
        _ => vec![GemmDtype::BF16, GemmDtype::F16],
    };
    let gpu = match Gpu::open() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("tune_experts: no GPU: {why}");
            std::process::exit(2);
        }
    };
    let device = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let mut times: BTreeMap<Key, Vec<(usize, f64)>> = BTreeMap::new();
    let mut report = String::new();
    let mut invalid = Vec::new();
    writeln!(report, "# Expert-GEMM tuning run\n\nDevice: {device}. Each configuration validated (64 sampled outputs vs host f64, relative error <= 2e-2 bf16 / 5e-3 f16) before timing; times are the best of 3 averages of 8 back-to-back launches (CUDA events). TFLOP/s = 2 T k F H / time.\n").unwrap();
    for shape in SHAPES {
        for &t in &TOKENS {
            let p = match Problem::new(&gpu, shape, t) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{} T={t}: setup failed: {e}", shape.0);
                    continue;
                }
            };
            let b = bucket(t * p.k, p.e);
            writeln!(
                report,
                "## {} T={t} (bucket {b}, {} experts touched, {:.1} MB of weights)\n",
                p.name,
                p.touched,
                p.weight_bytes() / 1e6
            )
            .unwrap();
            writeln!(
                report,
                "| dtype | epilogue | kernel | us | TFLOP/s | weight GB/s |\n|---|---|---|---|---|---|"
            )
            .unwrap();
            for &dt in &dtypes {
                // permute cost per block size (wgmma GEMM1 needs it)
                let mut perm = BTreeMap::new();
                for &bm in &[64usize, 128] {
                    if let Ok(us) = time_us(&gpu, || p.permute(&gpu, dt, bm)) {
                        perm.insert(bm, us);
                    }
                }
                for epi in [Epilogue::SwiGlu, Epilogue::Down] {
                    let mut rows = Vec::new();
                    for (id, c) in GEMMS.iter().enumerate() {
                        if c.dtype != dt
                            || c.epilogue != epi
                            || gpu.kernels().gemm_info(GemmId::from_index(id).unwrap()).is_none()
                        {
                            continue;
                        }
                        let tol = if dt == GemmDtype::BF16 { 2e-2 } else { 5e-3 };
                        match p.validate(&gpu, id, 64) {
                            Ok(err) if err <= tol => {}
                            Ok(err) => {
                                invalid.push(format!(
                                    "{} T={t} {}: relative error {err:.2e}",
                                    p.name,
                                    c.name()
                                ));
                                continue;
                            }
                            Err(why) => {
                                invalid.push(format!("{} T={t} {}: {why}", p.name, c.name()));
                                continue;
                            }
                        }
                        let bm = c.bm as usize;
                        let mut us = match time_us(&gpu, || p.launch(&gpu, id, bm)) {
                            Ok(us) => us,
                            Err(why) => {
                                invalid.push(format!("{} T={t} {}: {why}", p.name, c.name()));
                                continue;
                            }
                        };
                        if epi == Epilogue::SwiGlu && c.generation == Generation::Wgmma {
                            us += perm.get(&bm).copied().unwrap_or(0.0);
                        }
                        rows.push((id, us));
                    }
                    rows.sort_by(|a, b| a.1.total_cmp(&b.1));
                    for &(id, us) in rows.iter().take(6) {
                        writeln!(
                            report,
                            "| {:?} | {:?} | {} | {:.1} | {:.1} | {:.0} |",
                            dt,
                            epi,
                            GEMMS[id].name(),
                            us,
                            p.flops() / us / 1e6,
                            p.weight_bytes() / us / 1e3
                        )
                        .unwrap();
                    }
                    for genr in [Generation::Mma, Generation::Wgmma] {
                        let best = rows.iter().find(|r| GEMMS[r.0].generation == genr);
                        if let Some(&(id, us)) = best {
                            eprintln!(
                                "{} T={t} {:?} {:?} best {:?}: {} {:.1} us ({:.1} TFLOP/s)",
                                p.name,
                                dt,
                                epi,
                                genr,
                                GEMMS[id].name(),
                                us,
                                p.flops() / us / 1e6
                            );
                        }
                    }
                    times.insert((p.name.to_string(), dt as u8, t, epi as u8), rows);
                }
            }
            report.push('\n');
        }
    }
    // Choose per (epilogue, dtype, bucket, generation).
    let mut table = format!(
        "# medley expert-GEMM tuning table, written by benches/src/bin/tune_experts.rs\n# device: {device}\n# epilogue dtype bucket entry cost (sum over the bucket's problems of time / best time)\n"
    );
    for &dt in &dtypes {
        for epi in [Epilogue::SwiGlu, Epilogue::Down] {
            for b in 0..BUCKETS as u8 {
                let probs: Vec<&Vec<(usize, f64)>> = times
                    .iter()
                    .filter(|(key, _)| key.1 == dt as u8 && key.3 == epi as u8)
                    .filter(|(key, _)| {
                        let shape = SHAPES.iter().find(|s| s.0 == key.0).expect("shape");
                        bucket(key.2 * shape.4, shape.3) == b
                    })
                    .map(|(_, v)| v)
                    .collect();
                if probs.is_empty() {
                    continue;
                }
                for genr in [Generation::Mma, Generation::Wgmma] {
                    let mut best: Option<(usize, f64)> = None;
                    for (id, c) in GEMMS.iter().enumerate() {
                        if c.generation != genr || c.dtype != dt || c.epilogue != epi {
                            continue;
                        }
                        let mut cost = 0.0;
                        let mut ok = true;
                        for rows in &probs {
                            let fastest = rows.first().map(|r| r.1).unwrap_or(f64::INFINITY);
                            match rows.iter().find(|r| r.0 == id) {
                                Some(r) => cost += r.1 / fastest,
                                None => ok = false,
                            }
                        }
                        if ok && best.is_none_or(|bst| cost < bst.1) {
                            best = Some((id, cost));
                        }
                    }
                    if let Some((id, cost)) = best {
                        let e = if epi == Epilogue::SwiGlu { "swiglu" } else { "down" };
                        let d = if dt == GemmDtype::BF16 { "bf16" } else { "f16" };
                        writeln!(table, "{e} {d} {b} {} {cost:.4}", GEMMS[id].name()).unwrap();
                    }
                }
            }
        }
    }
    if !invalid.is_empty() {
        writeln!(
            report,
            "## Configurations that failed validation ({})\n",
            invalid.len()
        )
        .unwrap();
        for i in &invalid {
            writeln!(report, "- {i}").unwrap();
        }
    } else {
        writeln!(report, "All configurations passed validation on every problem.").unwrap();
    }
    std::fs::write(&out, &table).expect("write the tuning table");
    std::fs::write(&report_path, &report).expect("write the report");
    println!("{table}");
    eprintln!("invalid configurations: {}", invalid.len());
    for i in &invalid {
        eprintln!("  {i}");
    }
}
