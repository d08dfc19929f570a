//! Training-time auxiliary losses and load statistics of a router.
//!
//! | quantity | function | formula |
//! |---|---|---|
//! | Switch load-balancing loss | [`switch_loss`] | `E * sum_e f_e * P_e`, `f_e` = share of the `T * k` slots routed to `e`, `P_e` = mean router probability of `e` (Fedus et al. 2021; with `k > 1` the MegaBlocks / HF Mixtral generalization) |
//! | importance | [`importance`] | `Importance_e = sum_x G(x)_e` (sum of the gate weights routed to `e`) |
//! | smooth load | [`noisy_load`] | `Load_e = sum_x Phi((x_e - kth_excluding(H, k, e)) / softplus(n_e))` (Shazeer et al. 2017) |
//! | CV² | [`cv_squared`] | `var / mean^2` (population variance); `L_imp = w * CV(Importance)^2`, `L_load = w * CV(Load)^2` |
//! | router z-loss | [`z_loss`] | `(1/T) sum_t logsumexp(x_t)^2` (ST-MoE, Zoph et al. 2022) |
//! | expert counts | [`expert_counts`] | slots per expert |
//! | bias update | [`bias_update`] | DeepSeek-V3 auxiliary-loss-free balancing: `b_e += gamma * sign(mean load - load_e)` |
//!
//! These are statistics over a whole batch, so they accumulate in `f64`
//! (sums of up to `T` terms per expert, in token order: deterministic), and
//! report the results as `f64` per-expert vectors and `f32` losses. Per-row
//! quantities (probabilities, log-sum-exp, `H`) are computed in `f32`
//! exactly as in [`gating`](super::gating). The losses are values, not
//! gradients: a training framework differentiates its own graph, and uses
//! these as the reference.
//!
//! A NaN logit makes its row's probabilities NaN, so the loss is NaN (not
//! hidden); a fully masked row (every logit `-inf`) has probabilities 0 and
//! `logsumexp = -inf`, so its z-loss term is `+inf`. Slots whose id is
//! [`NO_EXPERT`] (dropped) are counted in no expert.

use super::gating::{Noise, SEL, check_router, noisy_logit, select, with_scratch};
use super::{NO_EXPERT, check_ids, warp_sum_exp};
use crate::element::Element;
use crate::error::{Error, ensure, ensure_len};
use crate::math::act::{normal_cdf, softplus};
use crate::math::{exp, ln};
use crate::rows::Rows;
use crate::softmax::Report;

/// Slots routed to each expert: `counts[e] = #{i : ids[i] == e}`
/// ([`NO_EXPERT`] skipped). Returns the number of routed slots.
///
/// Errors: [`Error::IndexOutOfBounds`] (an id `>= counts.len()` other than
/// [`NO_EXPERT`]).
pub fn expert_counts(ids: &[u32], counts: &mut [u64]) -> Result<u64, Error> {
    check_ids(ids, counts.len())?;
    counts.fill(0);
    let mut n = 0;
    for &e in ids {
        if e != NO_EXPERT {
            counts[e as usize] += 1;
            n += 1;
        }
    }
    Ok(n)
}

/// The router probabilities `softmax(x)` of one row, passed to `each`, as the
/// gating functions compute them (NaN row: NaN; masked: 0; `+inf`: limit).
fn row_probs<T: Element>(row: &[T], mut each: impl FnMut(usize, f32)) {
    let mut nan = false;
    let mut m = f32::NEG_INFINITY;
    let mut n_inf = 0usize;
    for v in row {
        let x = v.to_f32();
        nan |= x.is_nan();
        n_inf += (x == f32::INFINITY) as usize;
        m = if x > m { x } else { m };
    }
    if nan {
        (0..row.len()).for_each(|e| each(e, f32::NAN));
        return;
    }
    if m == f32::NEG_INFINITY {
        (0..row.len()).for_each(|e| each(e, 0.0));
    } else if m == f32::INFINITY {
        let p = 1.0 / n_inf as f32;
        for (e, v) in row.iter().enumerate() {
            each(e, if v.to_f32() == f32::INFINITY { p } else { 0.0 });
        }
    } else {
        let s = warp_sum_exp(row, m);
        for (e, v) in row.iter().enumerate() {
            each(e, exp(v.to_f32() - m) / s);
        }
    }
}

/// The Switch Transformer load-balancing loss generalized to top-`k`:
/// `E * sum_e f_e * P_e` with `f_e = count_e / (T * k)` (the fraction of
/// slots routed to `e`) and `P_e = (1/T) sum_t softmax(x_t)_e`. Equals 1
/// under perfectly uniform routing and probabilities; multiply by the
/// coefficient (`alpha = 1e-2` in Switch) yourself.
///
/// `logits` is the `[T, E]` router output, `ids` the `[T, k]` routing (as
/// gated; [`NO_EXPERT`] slots count in the `T * k` denominator but in no
/// expert). Writes `fraction[e] = f_e` and `mean_prob[e] = P_e` (both `E`
/// long). `T = 0` gives loss 0 and zero vectors.
///
/// Errors: the router-shape errors of [`gating`](super::gating) (`logits.len`,
/// `k`), [`Error::LengthMismatch`] (`ids`, `fraction`, `mean_prob`),
/// [`Error::IndexOutOfBounds`] (`ids`).
pub fn switch_loss<T: Element>(
    logits: Rows<'_, T>,
    ids: &[u32],
    k: usize,
    fraction: &mut [f64],
    mean_prob: &mut [f64],
) -> Result<f32, Error> {
    let e = check_router(&logits, k)?;
    let t = logits.rows();
    let n = t.checked_mul(k).ok_or(Error::SizeOverflow { arg: "ids" })?;
    ensure_len("ids", n, ids.len())?;
    ensure_len("fraction", e, fraction.len())?;
    ensure_len("mean_prob", e, mean_prob.len())?;
    check_ids(ids, e)?;
    fraction.fill(0.0);
    mean_prob.fill(0.0);
    if t == 0 {
        return Ok(0.0);
    }
    for &i in ids {
        if i != NO_EXPERT {
            fraction[i as usize] += 1.0;
        }
    }
    for tok in 0..t {
        row_probs(logits.row(tok), |i, p| mean_prob[i] += p as f64);
    }
    let mut loss = 0.0f64;
    for (f, p) in fraction.iter_mut().zip(mean_prob.iter_mut()) {
        *f /= n as f64;
        *p /= t as f64;
        loss += *f * *p;
    }
    Ok((loss * e as f64) as f32)
}

/// Importance (Shazeer et al. 2017): `out[e] = sum` of the gate weights of
/// the slots routed to `e` (`ids`, `weights` the `[T, k]` routing;
/// [`NO_EXPERT`] slots skipped; summed in slot order in `f64`). Feed it to
/// [`cv_squared`] for `L_importance`.
///
/// Errors: [`Error::LengthMismatch`] (`weights` vs `ids`),
/// [`Error::IndexOutOfBounds`] (an id `>= out.len()`).
pub fn importance(ids: &[u32], weights: &[f32], out: &mut [f64]) -> Result<(), Error> {
    ensure_len("weights", ids.len(), weights.len())?;
    check_ids(ids, out.len())?;
    out.fill(0.0);
    for (&e, &w) in ids.iter().zip(weights) {
        if e != NO_EXPERT {
            out[e as usize] += w as f64;
        }
    }
    Ok(())
}

/// The smooth load estimator of noisy top-`k` gating (Shazeer et al. 2017,
/// appendix A): `out[e] = sum_t P(t, e)` with
///
/// `P(t, e) = Phi((x_e - kth_excluding(H, k, e)) / softplus(n_e))`,
///
/// where `H` is the noisy logit row of [`noisy_topk`](super::gating::noisy_topk)
/// drawn from the same [`Noise`] (so it is the same `H`, recomputed, not
/// stored), `x` the clean logits, `n` the noise logits, and
/// `kth_excluding(H, k, e)` the `k`-th largest of `H` without entry `e`:
/// the `(k+1)`-th largest overall if `e` is among the top `k` (in the tie
/// order of the gating), else the `k`-th; `-inf` if it does not exist
/// (`k = E`). When the difference is 0 (including `-inf - -inf`) the
/// argument is 0; when `softplus(n_e) = 0` the argument is `±inf` by the
/// sign of the difference. `Phi` is [`normal_cdf`].
///
/// NaN rows make the load NaN and are counted in [`Report::nan_rows`];
/// fully masked rows (every `H` `-inf`) contribute 0 and are counted in
/// [`Report::masked_rows`].
///
/// Errors: those of [`noisy_topk`](super::gating::noisy_topk) (without the
/// ids and weights) and [`Error::LengthMismatch`] (`out`, `E` long).
pub fn noisy_load<T: Element>(
    clean: Rows<'_, T>,
    noise_logits: Rows<'_, T>,
    k: usize,
    noise: Noise,
    out: &mut [f64],
) -> Result<Report, Error> {
    let e = check_router(&clean, k)?;
    let t = clean.rows();
    ensure_len("noise_logits.rows", t, noise_logits.rows())?;
    ensure_len("noise_logits.len", e, noise_logits.len())?;
    ensure_len("out", e, out.len())?;
    noise.check(t, e)?;
    out.fill(0.0);
    let mut rep = Report::default();
    let cap = (k + 1).min(e).min(SEL);
    for tok in 0..t {
        let (x, n) = (clean.row(tok), noise_logits.row(tok));
        let s = with_scratch(e, |h| {
            for (i, v) in h.iter_mut().enumerate() {
                *v = noisy_logit(x[i].to_f32(), n[i].to_f32(), noise.sample(e, tok, i));
            }
            select(h, cap)
        });
        if s.nan {
            out.iter_mut().for_each(|o| *o = f64::NAN);
            rep.nan_rows += 1;
            continue;
        }
        if s.top.val[0] == f32::NEG_INFINITY {
            rep.masked_rows += 1;
            continue;
        }
        // The top-k ids in increasing order, for an O(E + k) membership walk.
        let mut members = [0u32; SEL];
        members[..k].copy_from_slice(&s.top.idx[..k]);
        members[..k].sort_unstable();
        let thr_in = if k < e { s.top.val[k] } else { f32::NEG_INFINITY };
        let thr_out = s.top.val[k - 1];
        let mut next = 0;
        for (i, o) in out.iter_mut().enumerate() {
            let inside = next < k && members[next] == i as u32;
            next += inside as usize;
            let thr = if inside { thr_in } else { thr_out };
            let xi = x[i].to_f32();
            let d = if xi == thr { 0.0 } else { xi - thr };
            let sd = softplus(n[i].to_f32());
            let z = if sd == 0.0 {
                if d > 0.0 {
                    f32::INFINITY
                } else if d < 0.0 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            } else {
                d / sd
            };
            *o += normal_cdf(z) as f64;
        }
    }
    Ok(rep)
}

/// The squared coefficient of variation `var / mean^2` of `values`
/// (population variance, two passes in `f64`); 0 when the mean is 0 (all
/// zero loads: nothing to balance) or for a single value. The reference
/// implementation of Shazeer et al. uses torch's unbiased variance, which is
/// this times `n / (n - 1)`. NaN in, NaN out.
///
/// Errors: [`Error::Empty`] (`values`).
pub fn cv_squared(values: &[f64]) -> Result<f32, Error> {
    ensure(!values.is_empty(), Error::Empty { arg: "values" })?;
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if mean == 0.0 {
        return Ok(0.0);
    }
    let var = values.iter().map(|&v| (v - mean) * (v - mean)).sum::<f64>() / n;
    Ok((var / (mean * mean)) as f32)
}

/// The router z-loss (ST-MoE): `(1/T) sum_t logsumexp(x_t)^2`, each row's
/// log-sum-exp `m + ln(S)` in `f32` (warp-order `S`), squared and summed
/// in `f64`. Multiply by the coefficient (`1e-3` in ST-MoE) yourself.
/// `T = 0` gives 0; a NaN row gives NaN, a fully masked or `+inf` row
/// `+inf`.
///
/// Errors: [`Error::Empty`] (`logits.len` = 0).
pub fn z_loss<T: Element>(logits: Rows<'_, T>) -> Result<f32, Error> {
    let e = logits.len();
    ensure(e != 0, Error::Empty { arg: "logits.len" })?;
    let t = logits.rows();
    if t == 0 {
        return Ok(0.0);
    }
    let mut acc = 0.0f64;
    for tok in 0..t {
        let row = logits.row(tok);
        let mut m = f32::NEG_INFINITY;
        let mut nan = false;
        for v in row {
            let x = v.to_f32();
            nan |= x.is_nan();
            m = if x > m { x } else { m };
        }
        let lse = if nan {
            f32::NAN
        } else if m.is_infinite() {
            m
        } else {
            m + ln(warp_sum_exp(row, m))
        };
        acc += lse as f64 * lse as f64;
    }
    Ok((acc / t as f64) as f32)
}

/// DeepSeek-V3's auxiliary-loss-free balancing step: with `counts` the
/// slots each expert received in the last batch (e.g. from
/// [`expert_counts`]) and `mean` their average, `bias[e] -= gamma` if
/// `counts[e] > mean` (overloaded), `bias[e] += gamma` if `counts[e] <
/// mean`, unchanged if equal (compared exactly in integers). The bias then
/// feeds [`GroupedConfig::bias`](super::gating::GroupedConfig::bias).
///
/// Errors: [`Error::LengthMismatch`] (`bias` vs `counts`),
/// [`Error::NonFinite`] / [`Error::OutOfRange`] (`gamma` not finite and
/// `>= 0`), [`Error::NonFinite`] (an updated bias that overflows; `bias`
/// is then left untouched).
pub fn bias_update(counts: &[u64], gamma: f32, bias: &mut [f32]) -> Result<(), Error> {
    ensure_len("bias", counts.len(), bias.len())?;
    ensure(
        gamma.is_finite(),
        Error::NonFinite {
            arg: "gamma",
            index: 0,
        },
    )?;
    ensure(
        gamma >= 0.0,
        Error::OutOfRange {
            arg: "gamma",
            index: 0,
        },
    )?;
    let total: u128 = counts.iter().map(|&c| c as u128).sum();
    let e = counts.len() as u128;
    let step = |c: u64, b: f32| -> f32 {
        let scaled = c as u128 * e;
        if scaled > total {
            b - gamma
        } else if scaled < total {
            b + gamma
        } else {
            b
        }
    };
    for (i, (&c, &b)) in counts.iter().zip(bias.iter()).enumerate() {
        ensure(
            step(c, b).is_finite(),
            Error::NonFinite {
                arg: "bias",
                index: i,
            },
        )?;
    }
    for (&c, b) in counts.iter().zip(bias.iter_mut()) {
        *b = step(c, *b);
    }
    Ok(())
}
