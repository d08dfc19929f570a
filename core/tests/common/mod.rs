//! Naive f64 references and input generators shared by the integration tests.
//! The references are written straight from the math in the module docs,
//! in f64, with no attempt at speed.
#![allow(dead_code, unreachable_pub)]

pub const NEG_INF: f64 = f64::NEG_INFINITY;

/// SplitMix64: deterministic values derived from a proptest-chosen seed.
pub struct Gen(pub u64);

impl Gen {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    /// A logit: mostly uniform in [-scale, scale], `-inf` with probability `p_mask`.
    pub fn logit(&mut self, scale: f64, p_mask: f64) -> f32 {
        if self.chance(p_mask) {
            f32::NEG_INFINITY
        } else {
            self.range(-scale, scale) as f32
        }
    }
}

/// LSE in f64; `-inf` for an empty or all `-inf` input.
pub fn lse(xs: &[f64]) -> f64 {
    let m = xs.iter().cloned().fold(NEG_INF, f64::max);
    if m == NEG_INF {
        return NEG_INF;
    }
    m + xs.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

/// log-softmax of `x / t`; all `-inf` when every entry is `-inf`.
pub fn log_softmax(x: &[f64], t: f64) -> Vec<f64> {
    let s: Vec<f64> = x.iter().map(|&v| v / t).collect();
    let l = lse(&s);
    s.iter()
        .map(|&v| if l == NEG_INF { NEG_INF } else { v - l })
        .collect()
}

/// One model of a reference combination: row-major logits of `b` rows and
/// `len` valid tokens (already upcast to f64), and a temperature.
pub struct RefModel {
    pub rows: Vec<Vec<f64>>,
    pub t: f64,
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum RefMode {
    Linear { mask_any: bool },
    LogLinear,
}

/// Reference combination of one row. Returns `None` for a fully masked row,
/// else the `v` log-probabilities and the log-normalizer.
pub fn combine_row(
    models: &[RefModel],
    b: usize,
    weights: &[f64],
    mode: RefMode,
    t_out: f64,
    plaus: Option<(usize, f64)>,
    v: usize,
) -> Option<(Vec<f64>, f64)> {
    let active: Vec<usize> = (0..models.len()).filter(|&m| weights[m] != 0.0).collect();
    let z = |m: usize, i: usize| -> f64 { models[m].rows[b].get(i).copied().unwrap_or(NEG_INF) };
    // Unnormalized log-score u (before the output temperature for linear).
    let mut u = vec![NEG_INF; v];
    let mut ln_mass = 0.0;
    match mode {
        RefMode::LogLinear => {
            for (i, ui) in u.iter_mut().enumerate() {
                let masked = active.iter().any(|&m| z(m, i) == NEG_INF);
                *ui = if masked {
                    NEG_INF
                } else {
                    active
                        .iter()
                        .map(|&m| weights[m] / (models[m].t * t_out) * z(m, i))
                        .sum()
                };
            }
        }
        RefMode::Linear { mask_any } => {
            let lps: Vec<Vec<f64>> = active
                .iter()
                .map(|&m| {
                    let full: Vec<f64> = (0..v).map(|i| z(m, i)).collect();
                    log_softmax(&full, models[m].t)
                })
                .collect();
            let any_row_masked = lps.iter().any(|lp| lp.iter().all(|&x| x == NEG_INF));
            if mask_any && any_row_masked {
                return None;
            }
            // Fully masked models leave the mixture (their weight does not count).
            let wsum: f64 = active
                .iter()
                .zip(&lps)
                .filter(|(_, lp)| lp.iter().any(|&x| x > NEG_INF))
                .map(|(&m, _)| weights[m])
                .sum();
            ln_mass = wsum.ln();
            for (i, ui) in u.iter_mut().enumerate() {
                let terms: Vec<f64> = active
                    .iter()
                    .zip(&lps)
                    .filter(|(_, lp)| lp.iter().any(|&x| x > NEG_INF))
                    .map(|(&m, lp)| (weights[m] / wsum).ln() + lp[i])
                    .collect();
                let masked = mask_any && active.iter().any(|&m| z(m, i) == NEG_INF);
                *ui = if masked { NEG_INF } else { lse(&terms) };
            }
        }
    }
    if let Some((j, alpha)) = plaus {
        let full: Vec<f64> = (0..v).map(|i| z(j, i)).collect();
        let lpj = log_softmax(&full, models[j].t);
        let mx = lpj.iter().cloned().fold(NEG_INF, f64::max);
        if mx == NEG_INF {
            return None;
        }
        for (i, ui) in u.iter_mut().enumerate() {
            let keep = alpha == 0.0 || lpj[i] - mx >= alpha.ln();
            if !keep {
                *ui = NEG_INF;
            }
        }
    }
    let linear = matches!(mode, RefMode::Linear { .. });
    let renorm = !linear || t_out != 1.0 || plaus.is_some() || mode == (RefMode::Linear { mask_any: true });
    if linear {
        for x in u.iter_mut() {
            *x /= t_out;
        }
    }
    let l = lse(&u);
    if l == NEG_INF {
        return None;
    }
    if !renorm {
        return Some((u, ln_mass));
    }
    let out: Vec<f64> = u.iter().map(|&x| x - l).collect();
    let log_z = if linear { ln_mass / t_out + l } else { l };
    Some((out, log_z))
}

/// Threshold margin: how close any token of row `b` is to the plausibility
/// cut (in log-probability units). Tests skip cases closer than rounding.
pub fn plaus_margin(m: &RefModel, b: usize, alpha: f64, v: usize) -> f64 {
    if alpha == 0.0 {
        return f64::INFINITY;
    }
    let full: Vec<f64> = (0..v)
        .map(|i| m.rows[b].get(i).copied().unwrap_or(NEG_INF))
        .collect();
    let lp = log_softmax(&full, m.t);
    let mx = lp.iter().cloned().fold(NEG_INF, f64::max);
    lp.iter()
        .filter(|x| x.is_finite())
        .map(|&x| (x - mx - alpha.ln()).abs())
        .fold(f64::INFINITY, f64::min)
}

/// Asserts that `got` (f32 log-probs) matches `want` (f64): identical `-inf`
/// pattern, finite entries within `abs + rel * |want|`, and the
/// probabilities within `prob_rel` in relative L2 norm.
pub fn assert_logprobs_close(
    got: &[f32],
    want: &[f64],
    abs: f64,
    rel: f64,
    prob_rel: f64,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("length {} vs {}", got.len(), want.len()));
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == NEG_INF || g == f32::NEG_INFINITY {
            // Both masked, or the reference is so small f32 flushes it.
            if !(w == NEG_INF && g == f32::NEG_INFINITY) && w > -80.0 {
                return Err(format!("token {i}: got {g}, want {w}"));
            }
            continue;
        }
        if g.is_nan() || (g as f64 - w).abs() > abs + rel * w.abs() {
            return Err(format!("token {i}: got {g}, want {w}"));
        }
        let (pg, pw) = ((g as f64).exp(), w.exp());
        num += (pg - pw) * (pg - pw);
        den += pw * pw;
    }
    if den > 0.0 && (num / den).sqrt() > prob_rel {
        return Err(format!("probability relative error {}", (num / den).sqrt()));
    }
    Ok(())
}

/// Entropy, top-1 probability and margin of a reference row of
/// log-probabilities.
pub fn ref_uncertainty(lp: &[f64]) -> (f64, f64, f64) {
    let h: f64 = lp.iter().filter(|&&x| x > NEG_INF).map(|&x| -x.exp() * x).sum();
    let mut p: Vec<f64> = lp.iter().map(|&x| x.exp()).collect();
    p.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let p1 = p.first().copied().unwrap_or(0.0);
    let p2 = p.get(1).copied().unwrap_or(0.0);
    (h, p1, p1 - p2)
}

/// Reference disagreement of a linear row: `H(sum w P_m) - sum w H(P_m)`
/// over the live models (nonzero weight, row not fully masked), weights
/// normalized over them. `None` when no model is live.
pub fn ref_disagreement(models: &[RefModel], b: usize, weights: &[f64], v: usize) -> Option<f64> {
    let z = |m: usize, i: usize| -> f64 { models[m].rows[b].get(i).copied().unwrap_or(NEG_INF) };
    let mut live = Vec::new();
    for (m, &w) in weights.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        let full: Vec<f64> = (0..v).map(|i| z(m, i)).collect();
        let lp = log_softmax(&full, models[m].t);
        if lp.iter().any(|&x| x > NEG_INF) {
            live.push((w, lp));
        }
    }
    if live.is_empty() {
        return None;
    }
    let wsum: f64 = live.iter().map(|(w, _)| w).sum();
    let ent = |lp: &[f64]| -> f64 { lp.iter().filter(|&&x| x > NEG_INF).map(|&x| -x.exp() * x).sum() };
    let mix: Vec<f64> = (0..v)
        .map(|i| live.iter().map(|(w, lp)| w / wsum * lp[i].exp()).sum::<f64>())
        .collect();
    let h_mix: f64 = mix.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
    let h_members: f64 = live.iter().map(|(w, lp)| w / wsum * ent(lp)).sum();
    Some(h_mix - h_members)
}
