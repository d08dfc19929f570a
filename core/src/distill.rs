//! Ensemble distillation (word-level knowledge distillation, Kim and Rush
//! 2016): a student's logits against the combined distribution of an
//! ensemble of teachers.
//!
//! Per row, with `q` the teachers' combination (any [`Config`] of
//! [`crate::ensemble`]: linear teacher averaging is the usual choice) and
//! `p = softmax(z_s / T_s)` the student at temperature `T_s`:
//!
//! - soft-target cross-entropy `CE = -sum_v q(v) ln p(v)`
//! - `KL(q || p) = sum_v q(v) (ln q(v) - ln p(v))` (so `CE = H(q) + KL`)
//! - gradient of either loss with respect to the student logits
//!   `dL/dz_s(v) = grad_scale * (p(v) - q(v)) / T_s`.
//!   (Hinton-style KD multiplies by `T^2`; a mean over rows divides by `B`:
//!   both go into `grad_scale`; the losses are not scaled.)
//!
//! The combination is fused: `ln q` is written straight into the gradient
//! buffer and consumed there, so in log-linear mode every teacher logit is
//! read once (linear mode needs each teacher's normalizer first and reads the
//! teachers twice); the student row is read twice (statistics, then the
//! fused loss and gradient pass). Nothing of size `V` is allocated.
//!
//! # Edge cases
//!
//! - Tokens with `q(v) = 0` contribute nothing to either loss (`0 ln 0 = 0`).
//! - A token with `q(v) > 0` that the student masks (`p(v) = 0`) makes CE and
//!   KL `+inf` (the true value); the gradient stays finite.
//! - A row whose teacher distribution is fully masked has no target: CE and
//!   KL are 0 and the gradient row is 0 (like an ignored index); it is
//!   counted in [`Report::masked_rows`].
//! - A row whose teachers or student hold NaN / `+inf` logits has NaN losses
//!   and a NaN gradient row, counted in [`Report::nan_rows`].

use crate::ensemble::{Config, Model, Plan, Scratch, combine_row};
use crate::error::{Error, ensure, ensure_len, ensure_len_at};
use crate::math::exp;
use crate::rowops::{LANES, TILE, pairwise_sum};
use crate::rows::RowsMut;
use crate::softmax::{Report, RowStatus, inv_temperature};

/// Where [`distill`] writes.
#[derive(Debug)]
pub struct DistillOutput<'o> {
    /// Per row, the soft-target cross-entropy `-sum q ln p` (`B` values).
    pub cross_entropy: Option<&'o mut [f32]>,
    /// Per row, `KL(q || p)` (`B` values).
    pub kl: Option<&'o mut [f32]>,
    /// `B x V` gradient of the loss with respect to the student's logits.
    /// Required: it doubles as the scratch row holding `ln q`.
    pub grad: RowsMut<'o, f32>,
}

/// Losses and gradient of `student` against the combination of `teachers`
/// under `cfg`. The shape is taken from `out.grad` (`B x V`); the student
/// must have `B` rows of exactly `V` logits, each teacher `B` rows of
/// `V_m <= V`.
///
/// Errors: everything [`crate::ensemble::combine`] reports for the teachers,
/// plus [`Error::LengthMismatch`] (`student.logits.rows`,
/// `student.logits.len`, `cross_entropy`, `kl`), temperature errors for
/// `student.temperature`, and [`Error::NonFinite`] (`grad_scale`).
///
/// ```
/// use medley_core::{Rows, RowsMut};
/// use medley_core::ensemble::{Config, Model};
/// use medley_core::distill::{distill, DistillOutput};
/// let t1 = [1.0f32, 0.0, -1.0];
/// let t2 = [0.0f32, 1.0, -1.0];
/// let st = [0.5f32, 0.5, -1.0];
/// let teachers = [Model::new(Rows::single(&t1)), Model::new(Rows::single(&t2))];
/// let (mut ce, mut kl, mut g) = ([0.0f32], [0.0f32], [0.0f32; 3]);
/// let out = DistillOutput { cross_entropy: Some(&mut ce), kl: Some(&mut kl), grad: RowsMut::single(&mut g) };
/// distill(&teachers, &Config::linear(&[0.5, 0.5]), &Model::new(Rows::single(&st)), 1.0, out).unwrap();
/// assert!(kl[0] >= 0.0 && ce[0] >= kl[0]);
/// assert!(g.iter().sum::<f32>().abs() < 1e-6); // p and q both sum to 1
/// ```
pub fn distill(
    teachers: &[Model<'_>],
    cfg: &Config<'_>,
    student: &Model<'_>,
    grad_scale: f32,
    mut out: DistillOutput<'_>,
) -> Result<Report, Error> {
    let rows = out.grad.rows();
    let vocab = out.grad.len();
    ensure_len_at("student.logits.rows", 0, rows, student.logits.rows())?;
    ensure_len_at("student.logits.len", 0, vocab, student.logits.len())?;
    let inv_ts = inv_temperature("student.temperature", 0, student.temperature)?;
    ensure(
        grad_scale.is_finite(),
        Error::NonFinite {
            arg: "grad_scale",
            index: 0,
        },
    )?;
    if let Some(c) = &out.cross_entropy {
        ensure_len("cross_entropy", rows, c.len())?;
    }
    if let Some(k) = &out.kl {
        ensure_len("kl", rows, k.len())?;
    }
    let plan = Plan::new(teachers, cfg, rows, vocab)?;
    let mut s = Scratch::new();
    let mut report = Report::default();
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for b in 0..rows {
                let g = out.grad.row_mut(b);
                let teacher = combine_row(&plan, b, g, &mut s);
                let (ce, kl, status) = match teacher.status {
                    RowStatus::Nan => (f32::NAN, f32::NAN, RowStatus::Nan),
                    RowStatus::Masked => {
                        g.fill(0.0);
                        (0.0, 0.0, RowStatus::Masked)
                    }
                    RowStatus::Ok => {
                        let o = student.logits.online(b, inv_ts, &mut s.conv);
                        if o.bad {
                            g.fill(f32::NAN);
                            (f32::NAN, f32::NAN, RowStatus::Nan)
                        } else {
                            // ln p = (z - max) / T_s - ln sum; a fully masked student
                            // has p = 0 everywhere (shift +inf makes every ln p -inf).
                            let (shift, log_sum) = if o.max == f32::NEG_INFINITY {
                                (f32::INFINITY, 0.0)
                            } else {
                                (o.max, o.log_sum())
                            };
                            let (ce, kl) =
                                fused_row(student, b, g, shift, inv_ts, log_sum, grad_scale, &mut s.conv);
                            (ce, kl, RowStatus::Ok)
                        }
                    }
                };
                if status == RowStatus::Nan {
                    out.grad.row_mut(b).fill(f32::NAN);
                }
                report.add(status);
                if let Some(c) = out.cross_entropy.as_deref_mut() {
                    c[b] = ce;
                }
                if let Some(k) = out.kl.as_deref_mut() {
                    k[b] = kl;
                }
            }
        },
    );
    Ok(report)
}

/// One row's fused pass: `g` holds `ln q` on entry and the gradient on exit.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fused_row(
    student: &Model<'_>,
    b: usize,
    g: &mut [f32],
    shift: f32,
    inv_ts: f32,
    log_sum: f32,
    scale: f32,
    conv: &mut [f32; TILE],
) -> (f32, f32) {
    let gs = inv_ts * scale;
    let (mut ce_t, mut kl_t) = (0.0f32, 0.0f32);
    let mut lo = 0;
    while lo < g.len() {
        let hi = (lo + TILE).min(g.len());
        let z = student.logits.tile(b, lo, hi, conv);
        let gt = &mut g[lo..hi];
        let mut ce = [0.0f32; LANES];
        let mut kl = [0.0f32; LANES];
        let mut gi = gt.chunks_exact_mut(LANES);
        let mut zi = z.chunks_exact(LANES);
        for (gc, zc) in (&mut gi).zip(&mut zi) {
            for j in 0..LANES {
                let (c, k, gr) = token(gc[j], zc[j], shift, inv_ts, log_sum, gs);
                ce[j] += c;
                kl[j] += k;
                gc[j] = gr;
            }
        }
        let (mut ce_r, mut kl_r) = (0.0f32, 0.0f32);
        for (gv, &zv) in gi.into_remainder().iter_mut().zip(zi.remainder()) {
            let (c, k, gr) = token(*gv, zv, shift, inv_ts, log_sum, gs);
            ce_r += c;
            kl_r += k;
            *gv = gr;
        }
        ce_t += pairwise_sum(&ce) + ce_r;
        kl_t += pairwise_sum(&kl) + kl_r;
        lo = hi;
    }
    (ce_t, kl_t)
}

/// One token: (CE term, KL term, gradient) from `ln q` and the student logit.
#[inline(always)]
fn token(lq: f32, z: f32, shift: f32, inv_ts: f32, log_sum: f32, gs: f32) -> (f32, f32, f32) {
    let lp = (z - shift) * inv_ts - log_sum;
    let lp = if lp.is_nan() { f32::NEG_INFINITY } else { lp }; // -inf - inf (masked student)
    let q = exp(lq);
    let p = exp(lp);
    let live = q > 0.0;
    let c = if live { -q * lp } else { 0.0 };
    let k = if live { q * (lq - lp) } else { 0.0 };
    (c, k, (p - q) * gs)
}
