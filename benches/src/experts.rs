//! Problems for the expert-GEMM benchmark and tuning harness: the MoE
//! shapes of `benches/baselines/pytorch-baselines-h100.json` (Mixtral:
//! H = 4096, F = 14336, E = 8, k = 2; DeepSeek-V3: H = 7168, F = 2048,
//! E = 256, k = 8) at T in {1, 16, 128, 1024, 4096}, on the device.
//!
//! Each problem is the baselines' "one projection": `T * k` routed rows
//! times an expert's `[F, H]` weight (`2 T k F H` FLOPs). GEMM1 runs it as
//! gate + up with `2I = F` (w13 `[E, F, H]`), GEMM2 as the down projection
//! with `N = H`, `K = I = F` (w2 `[E, H, F]`): the same FLOPs and weight
//! bytes. Both views share one weight buffer. Routing: `k` distinct
//! experts per token, uniformly at random (as `topk` of random logits).

use medley_core::moe::ExpertRange;
// The launch calls spelled as functions of their fields (shared with the
// medley-cuda test suites).
#[path = "../../cuda/tests/calls/mod.rs"]
mod calls;
use calls::{align, gemm1, gemm2, permute};
use medley_cuda::experts::{DeviceActMut, DevicePlan, Epilogue, GEMMS, GemmDtype, Generation};
use medley_cuda::mem::{DeviceMatrix, DeviceRows, DeviceRowsMut};
use medley_cuda::owned::{Buffer, Gpu};
use medley_cuda::routing::{AlignOutput, DeviceMatrixMut};

/// `(name, H, F, E, k)` of the baseline shapes.
pub const SHAPES: [(&str, usize, usize, usize, usize); 2] =
    [("mixtral", 4096, 14336, 8, 2), ("deepseek", 7168, 2048, 256, 8)];

/// Token counts of the baselines.
pub const TOKENS: [usize; 5] = [1, 16, 128, 1024, 4096];

/// Plan block sizes kept per problem (every GEMM's `bm` is one of them).
pub const BLOCKS: [usize; 4] = [16, 32, 64, 128];

/// A 16-bit pattern finite in both bf16 and f16, magnitude in
/// `[2^-3, 1)` as f16 (and small as bf16): the same bits serve both dtypes.
fn val(i: u64, seed: u64) -> u16 {
    let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 27;
    let sign = ((z >> 40) & 1) as u16;
    (sign << 15) | (0x3000 + (z & 0x0FFF) as u16)
}

/// `n` values in parallel (weights of DeepSeek-V3 are 3.8 G elements).
pub fn fill(n: usize, seed: u64) -> Vec<u16> {
    let mut v = vec![0u16; n];
    let threads = std::thread::available_parallelism()
        .map_or(4, |t| t.get())
        .min(32);
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (c, part) in v.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                for (j, x) in part.iter_mut().enumerate() {
                    *x = val((c * chunk + j) as u64, seed);
                }
            });
        }
    });
    v
}

/// Host value of 16-bit bits in `dt`.
pub fn decode(dt: GemmDtype, b: u16) -> f64 {
    match dt {
        GemmDtype::BF16 => medley_core::bf16::from_bits(b).to_f64(),
        GemmDtype::F16 => medley_core::f16::from_bits(b).to_f64(),
    }
}

/// One plan on the device and its host copy.
#[derive(Debug)]
pub struct PlanBufs {
    /// Block size.
    pub block_m: usize,
    /// Plan length.
    pub len: usize,
    sorted: Buffer,
    bexp: Buffer,
    total: Buffer,
    /// Host copies (read back once).
    pub sorted_h: Vec<u32>,
    /// Host copy of the block experts.
    pub bexp_h: Vec<u32>,
}

/// A benchmark problem on the device.
#[derive(Debug)]
pub struct Problem {
    /// Shape name.
    pub name: &'static str,
    /// Tokens, hidden, projection width, experts, experts per token.
    pub t: usize,
    /// Hidden size.
    pub h: usize,
    /// Projection width F.
    pub f: usize,
    /// Experts.
    pub e: usize,
    /// Experts per token.
    pub k: usize,
    /// Distinct experts touched.
    pub touched: usize,
    /// Host data (for validation).
    pub x_h: Vec<u16>,
    /// Host weights `[E, F, H]` (= `[E, H, F]` for GEMM2).
    pub w_h: Vec<u16>,
    /// Host GEMM2 input rows `[len_max, F]`.
    pub act_in_h: Vec<u16>,
    /// Routing weights.
    pub weights_h: Vec<f32>,
    x: Buffer,
    w: Buffer,
    wts: Buffer,
    act_in: Buffer,
    /// Plans, one per entry of [`BLOCKS`].
    pub plans: Vec<PlanBufs>,
    xp: Buffer,
    act: Buffer,
    y: Buffer,
}

impl Problem {
    /// Builds the problem `(name, H, F, E, k)` for `t` tokens on `gpu`.
    pub fn new(
        gpu: &Gpu,
        shape: (&'static str, usize, usize, usize, usize),
        t: usize,
    ) -> Result<Problem, String> {
        let (name, h, f, e, k) = shape;
        let n = t * k;
        let mut s = 0x1234_5678_u64 ^ (t as u64) << 20 ^ e as u64;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut ids = Vec::with_capacity(n);
        for _ in 0..t {
            let mut picked: Vec<u32> = Vec::with_capacity(k);
            while picked.len() < k {
                let c = (next() % e as u64) as u32;
                if !picked.contains(&c) {
                    picked.push(c);
                }
            }
            ids.extend(picked);
        }
        let weights_h: Vec<f32> = (0..n).map(|_| 0.25 + (next() % 1000) as f32 / 1000.0).collect();
        let mut seen = vec![false; e];
        for &i in &ids {
            seen[i as usize] = true;
        }
        let touched = seen.iter().filter(|&&b| b).count();
        let x_h = fill(t * h, 1);
        let w_h = fill(e * f * h, 2);
        let dids = Buffer::from_slice(&ids)?;
        let mut plans = Vec::new();
        let mut max_len = 0;
        for &bm in &BLOCKS {
            let (len, blocks) =
                medley_core::moe::plan::block_padded_len(n, e, bm).map_err(|e| format!("{e:?}"))?;
            let (sorted, bexp, total) = (
                Buffer::zeroed(len * 4)?,
                Buffer::zeroed(blocks * 4)?,
                Buffer::zeroed(4)?,
            );
            align(
                gpu.kernels(),
                dids.view(n),
                e,
                ExpertRange::all(e),
                bm,
                AlignOutput {
                    sorted_ids: sorted.view_mut(len),
                    block_experts: bexp.view_mut(blocks),
                    total: total.view_mut(1),
                    offsets: None,
                    inverse: None,
                },
                gpu.stream(),
            )
            .map_err(|e| format!("{e:?}"))?;
            gpu.synchronize().map_err(|e| format!("{e:?}"))?;
            let sorted_h = sorted.to_vec(len)?;
            let bexp_h = bexp.to_vec(blocks)?;
            max_len = max_len.max(len);
            plans.push(PlanBufs {
                block_m: bm,
                len,
                sorted,
                bexp,
                total,
                sorted_h,
                bexp_h,
            });
        }
        let act_in_h = fill(max_len * f, 3);
        Ok(Problem {
            name,
            t,
            h,
            f,
            e,
            k,
            touched,
            x: Buffer::from_slice(&x_h)?,
            w: Buffer::from_slice(&w_h)?,
            wts: Buffer::from_slice(&weights_h)?,
            act_in: Buffer::from_slice(&act_in_h)?,
            x_h,
            w_h,
            act_in_h,
            weights_h,
            plans,
            xp: Buffer::zeroed(max_len * h * 2)?,
            act: Buffer::zeroed(max_len * f * 2)?,
            y: Buffer::zeroed(max_len * h * 4)?,
        })
    }

    /// FLOPs of one projection: `2 T k F H`.
    pub fn flops(&self) -> f64 {
        2.0 * (self.t * self.k) as f64 * self.f as f64 * self.h as f64
    }

    /// Weight bytes the projection touches.
    pub fn weight_bytes(&self) -> f64 {
        (self.touched * self.f * self.h * 2) as f64
    }

    fn plan(&self, bm: usize) -> &PlanBufs {
        self.plans
            .iter()
            .find(|p| p.block_m == bm)
            .expect("plan block size")
    }

    /// Permutes x into plan order for block size `bm` (what a wgmma GEMM1
    /// reads; the layer runs it before GEMM1).
    pub fn permute(&self, gpu: &Gpu, dt: GemmDtype, bm: usize) -> Result<(), String> {
        let p = self.plan(bm);
        let (t, h) = (self.t, self.h);
        macro_rules! go {
            ($T:ty, $M:ident) => {
                permute(
                    gpu.kernels(),
                    DeviceMatrix::$M(
                        DeviceRows::dense(self.x.view::<$T>(t * h), t, h).map_err(|e| format!("{e:?}"))?,
                    ),
                    self.k,
                    p.sorted.view(p.len),
                    p.total.view(1),
                    DeviceMatrixMut::$M(
                        DeviceRowsMut::dense(self.xp.view_mut::<$T>(p.len * h), p.len, h)
                            .map_err(|e| format!("{e:?}"))?,
                    ),
                    gpu.stream(),
                )
            };
        }
        match dt {
            GemmDtype::BF16 => go!(medley_core::bf16, BF16),
            GemmDtype::F16 => go!(medley_core::f16, F16),
        }
        .map_err(|e| format!("{e:?}"))
    }

    /// Launches GEMM `id` once (GEMM1: gate/up over w13 `[E, F, H]`;
    /// GEMM2: down over w2 `[E, H, F]`), with the plan of block `bm` (a
    /// multiple of the config's). A wgmma GEMM1 reads x permuted by
    /// [`Problem::permute`].
    pub fn launch(&self, gpu: &Gpu, id: usize, bm: usize) -> Result<(), String> {
        let c = &GEMMS[id];
        let p = self.plan(bm);
        let plan = DevicePlan {
            sorted_ids: p.sorted.view(p.len),
            block_experts: p.bexp.view(p.len / bm),
            total: p.total.view(1),
            block_m: bm,
            slots: self.t * self.k,
            k: self.k,
        };
        let (t, h, f, e, len) = (self.t, self.h, self.f, self.e, p.len);
        let i1 = f / 2;
        let er = |e: medley_cuda::CudaError| format!("{e:?}");
        macro_rules! go {
            ($T:ty, $M:ident) => {
                match c.epilogue {
                    Epilogue::SwiGlu => {
                        let plan_order = c.generation == Generation::Wgmma;
                        let x = if plan_order {
                            DeviceMatrix::$M(
                                DeviceRows::dense(self.xp.view::<$T>(len * h), len, h).map_err(er)?,
                            )
                        } else {
                            DeviceMatrix::$M(DeviceRows::dense(self.x.view::<$T>(t * h), t, h).map_err(er)?)
                        };
                        gemm1(
                            gpu.kernels(),
                            id,
                            x,
                            plan_order,
                            &plan,
                            DeviceMatrix::$M(
                                DeviceRows::dense(self.w.view::<$T>(e * f * h), e * f, h).map_err(er)?,
                            ),
                            DeviceActMut::$M(
                                DeviceRowsMut::dense(self.act.view_mut::<$T>(len * i1), len, i1)
                                    .map_err(er)?,
                            ),
                            gpu.stream(),
                        )
                    }
                    Epilogue::Down => gemm2(
                        gpu.kernels(),
                        id,
                        DeviceMatrix::$M(
                            DeviceRows::dense(self.act_in.view::<$T>(len * f), len, f).map_err(er)?,
                        ),
                        &plan,
                        DeviceMatrix::$M(
                            DeviceRows::dense(self.w.view::<$T>(e * h * f), e * h, f).map_err(er)?,
                        ),
                        self.wts.view(t * self.k),
                        DeviceRowsMut::dense(self.y.view_mut(len * h), len, h).map_err(er)?,
                        gpu.stream(),
                    ),
                }
            };
        }
        match c.dtype {
            GemmDtype::BF16 => go!(medley_core::bf16, BF16),
            GemmDtype::F16 => go!(medley_core::f16, F16),
        }
        .map_err(er)
    }

    /// Runs GEMM `id` once (after a permute if it needs one) and checks
    /// `samples` output elements at random real positions against f64 dot
    /// products on the host. Returns the relative error of the sample.
    pub fn validate(&self, gpu: &Gpu, id: usize, samples: usize) -> Result<f64, String> {
        let c = &GEMMS[id];
        let bm = c.bm as usize;
        let p = self.plan(bm);
        let (h, f, k) = (self.h, self.f, self.k);
        let i1 = f / 2;
        // Poison the outputs first (all-ones bytes: NaN in every dtype), so
        // a configuration that writes nothing cannot pass on stale results.
        let (out_buf, ncols) = match c.epilogue {
            Epilogue::SwiGlu => (&self.act, i1),
            Epilogue::Down => (&self.y, h),
        };
        // SAFETY: the buffer is ours, live, and at least this long; the
        // stream is the Gpu's own.
        unsafe {
            medley_cuda::driver::memset_d8_async(out_buf.as_raw(), 0xFF, out_buf.len(), gpu.stream().raw())
        }
        .map_err(|e| format!("{e:?}"))?;
        if c.epilogue == Epilogue::SwiGlu && c.generation == Generation::Wgmma {
            self.permute(gpu, c.dtype, bm)?;
        }
        self.launch(gpu, id, bm)?;
        gpu.synchronize().map_err(|e| format!("{e:?}"))?;
        let real: Vec<usize> = (0..p.len)
            .filter(|&q| (p.sorted_h[q] as usize) < self.t * k)
            .collect();
        if real.is_empty() {
            return Ok(0.0);
        }
        let (mut num, mut den) = (0.0f64, 0.0f64);
        let mut s = 0x51u64 ^ id as u64;
        // Reads `n` bytes at byte offset `o` of the output (one small copy
        // per sample: the outputs reach gigabytes).
        let read = |o: usize, n: usize| -> Result<[u8; 4], String> {
            let mut b = [0u8; 4];
            // SAFETY: o + n lies inside out_buf (positions < len, columns <
            // ncols of the element size), which is live; the copy is waited
            // for below before `b` is read.
            unsafe {
                medley_cuda::driver::copy_dtoh_async(
                    &mut b[..n],
                    out_buf.as_raw() + o as u64,
                    gpu.stream().raw(),
                )
            }
            .map_err(|e| format!("{e:?}"))?;
            gpu.synchronize().map_err(|e| format!("{e:?}"))?;
            Ok(b)
        };
        for _ in 0..samples {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let q = real[(s >> 33) as usize % real.len()];
            let col = (s >> 13) as usize % ncols;
            let slot = p.sorted_h[q] as usize;
            let ex = p.bexp_h[q / bm] as usize;
            let dt = c.dtype;
            let (want, got) = match c.epilogue {
                Epilogue::SwiGlu => {
                    let xr = &self.x_h[(slot / k) * h..(slot / k + 1) * h];
                    let wg = &self.w_h[(ex * f + col) * h..(ex * f + col + 1) * h];
                    let wu = &self.w_h[(ex * f + i1 + col) * h..(ex * f + i1 + col + 1) * h];
                    let (mut g, mut u) = (0.0f64, 0.0f64);
                    for j in 0..h {
                        let xv = decode(dt, xr[j]);
                        g += xv * decode(dt, wg[j]);
                        u += xv * decode(dt, wu[j]);
                    }
                    let want = g / (1.0 + (-g).exp()) * u;
                    let b = read((q * i1 + col) * 2, 2)?;
                    (want, decode(dt, u16::from_le_bytes([b[0], b[1]])))
                }
                Epilogue::Down => {
                    let ar = &self.act_in_h[q * f..(q + 1) * f];
                    let wr = &self.w_h[(ex * h + col) * f..(ex * h + col + 1) * f];
                    let mut acc = 0.0f64;
                    for j in 0..f {
                        acc += decode(dt, ar[j]) * decode(dt, wr[j]);
                    }
                    let want = self.weights_h[slot] as f64 * acc;
                    (want, f32::from_le_bytes(read((q * h + col) * 4, 4)?) as f64)
                }
            };
            if !got.is_finite() {
                return Err(format!("non-finite output {got} (want {want})"));
            }
            num += (got - want).powi(2);
            den += want.powi(2);
        }
        Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
    }
}
