//! Log-linear coefficients by Newton's method.

// Matrix and per-model loops read best with indices.
#![allow(clippy::needless_range_loop)]

use super::math64::{exp64, ln64};
use super::{check_models, check_targets};
use crate::ensemble::Model;
use crate::error::{Error, ensure, ensure_len};
use crate::math::sqrt_f64;

/// Most models [`fit_log_linear_newton`] fits at once (the `M x M` Hessian
/// lives on the stack).
pub const MAX_NEWTON_MODELS: usize = 16;

const MM: usize = MAX_NEWTON_MODELS;
/// Tokens per tile of the evaluation pass.
const NT: usize = 128;
/// Armijo's sufficient-decrease constant.
const ARMIJO: f64 = 1e-4;
/// Step halvings tried before the line search gives up.
const HALVINGS: usize = 50;

/// Options of [`fit_log_linear_newton`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NewtonOptions {
    /// L2 penalty: the objective is `NLL(c) + l2 |c|^2 / 2`. Finite, `>= 0`;
    /// default 0.
    pub l2: f64,
    /// Stop when the Euclidean norm of the objective's gradient is at most
    /// this. Finite, `>= 0`; default `1e-7`.
    pub tolerance: f64,
    /// Most Newton steps. Default 100; 0 returns the initial coefficients.
    pub max_iterations: usize,
}

impl Default for NewtonOptions {
    fn default() -> Self {
        Self {
            l2: 0.0,
            tolerance: 1e-7,
            max_iterations: 100,
        }
    }
}

/// What [`fit_log_linear_newton`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct NewtonReport {
    /// Newton steps accepted.
    pub iterations: usize,
    /// Mean negative log-likelihood per row, in nats, at the initial
    /// coefficients (without the L2 penalty).
    pub nll_before: f64,
    /// The same at the returned coefficients (at the `f64` iterate, which
    /// the `f32` output rounds). With `l2 = 0` never above `nll_before`;
    /// with `l2 > 0` the penalized objective never increases.
    pub nll_after: f64,
    /// Euclidean norm of the objective's gradient at the returned coefficients.
    pub gradient_norm: f64,
    /// True when the gradient norm reached the tolerance.
    pub converged: bool,
}

/// Objective, gradient and Hessian at one point (means over the rows).
struct Eval {
    nll: f64,
    obj: f64,
    g: [f64; MM],
    h: [[f64; MM]; MM],
}

impl Eval {
    const ZERO: Eval = Eval {
        nll: 0.0,
        obj: 0.0,
        g: [0.0; MM],
        h: [[0.0; MM]; MM],
    };

    fn grad_norm(&self, m: usize) -> f64 {
        sqrt_f64(self.g[..m].iter().map(|x| x * x).sum())
    }
}

/// The problem: models, `1/T_m`, targets, and the vocabulary `V' = min V_m`.
struct Problem<'p, 'a> {
    models: &'p [Model<'a>],
    inv_t: [f32; MM],
    targets: &'p [u32],
    vocab: usize,
    l2: f64,
}

impl Problem<'_, '_> {
    /// One pass over the logits at `c`. `Err(row)` at the first row holding
    /// a non-finite logit.
    fn eval(&self, c: &[f64], out: &mut Eval) -> Result<(), usize> {
        let m = self.models.len();
        let mut x = [[0.0f64; NT]; MM];
        let mut e = [0.0f64; NT];
        let mut conv = [0.0f32; NT];
        let (mut nll, mut g, mut h) = (0.0f64, [0.0f64; MM], [[0.0f64; MM]; MM]);
        for (b, &y) in self.targets.iter().enumerate() {
            let y = y as usize;
            // Running max of the scores u = sum_m c_m x_m, and the
            // max-shifted sums of exp(u), exp(u) x_m and exp(u) x_m x_k.
            let (mut mx, mut s) = (f64::NEG_INFINITY, 0.0f64);
            let mut mu = [0.0f64; MM];
            let mut s2 = [[0.0f64; MM]; MM];
            let mut u_y = 0.0f64;
            let mut x_y = [0.0f64; MM];
            let mut lo = 0;
            while lo < self.vocab {
                let hi = (lo + NT).min(self.vocab);
                let n = hi - lo;
                for (i, md) in self.models.iter().enumerate() {
                    let z = md.logits.tile(b, lo, hi, &mut conv);
                    let it = self.inv_t[i] as f64;
                    let mut bad = false;
                    for (d, &v) in x[i][..n].iter_mut().zip(z) {
                        bad |= !v.is_finite();
                        *d = v as f64 * it;
                    }
                    if bad {
                        return Err(b);
                    }
                }
                let mut tmax = f64::NEG_INFINITY;
                for v in 0..n {
                    let mut u = 0.0f64;
                    for i in 0..m {
                        u += c[i] * x[i][v];
                    }
                    e[v] = u;
                    tmax = if u > tmax { u } else { tmax };
                }
                if (lo..hi).contains(&y) {
                    u_y = e[y - lo];
                    for i in 0..m {
                        x_y[i] = x[i][y - lo];
                    }
                }
                if tmax > mx {
                    let r = exp64(mx - tmax);
                    s *= r;
                    for i in 0..m {
                        mu[i] *= r;
                        for k in 0..=i {
                            s2[i][k] *= r;
                        }
                    }
                    mx = tmax;
                }
                for ev in &mut e[..n] {
                    *ev = exp64(*ev - mx);
                    s += *ev;
                }
                for i in 0..m {
                    let xi = &x[i][..n];
                    mu[i] += e[..n].iter().zip(xi).map(|(a, b)| a * b).sum::<f64>();
                    for k in 0..=i {
                        let xk = &x[k][..n];
                        s2[i][k] += e[..n]
                            .iter()
                            .zip(xi)
                            .zip(xk)
                            .map(|((a, b), c)| a * b * c)
                            .sum::<f64>();
                    }
                }
                lo = hi;
            }
            // The scores are finite, so mx is finite and s >= 1.
            nll += ln64(s) + mx - u_y;
            let inv_s = 1.0 / s;
            let mut ex = [0.0f64; MM];
            for i in 0..m {
                ex[i] = mu[i] * inv_s;
                g[i] += ex[i] - x_y[i];
            }
            for i in 0..m {
                for k in 0..=i {
                    h[i][k] += s2[i][k] * inv_s - ex[i] * ex[k];
                }
            }
        }
        let inv_b = 1.0 / self.targets.len() as f64;
        out.nll = nll * inv_b;
        let mut pen = 0.0f64;
        for i in 0..m {
            pen += c[i] * c[i];
            out.g[i] = g[i] * inv_b + self.l2 * c[i];
            for k in 0..=i {
                let v = h[i][k] * inv_b + if i == k { self.l2 } else { 0.0 };
                out.h[i][k] = v;
                out.h[k][i] = v;
            }
        }
        out.obj = out.nll + 0.5 * self.l2 * pen;
        Ok(())
    }
}

/// Cholesky factorization of the leading `m x m` block of `a` into `l`
/// (lower); false when a pivot is not above `eps`.
fn cholesky(a: &[[f64; MM]; MM], damping: f64, m: usize, eps: f64, l: &mut [[f64; MM]; MM]) -> bool {
    for j in 0..m {
        let mut d = a[j][j] + damping;
        for k in 0..j {
            d -= l[j][k] * l[j][k];
        }
        if !(d > eps) {
            return false;
        }
        let ljj = sqrt_f64(d);
        l[j][j] = ljj;
        for i in j + 1..m {
            let mut v = a[i][j];
            for k in 0..j {
                v -= l[i][k] * l[j][k];
            }
            l[i][j] = v / ljj;
        }
    }
    true
}

/// The Newton direction `d = -(H + lambda I)^-1 g`, with `lambda = 0` when
/// `H` is positive definite and the smallest damping (1e-10 of the largest
/// diagonal entry, growing tenfold) that makes it so otherwise (collinear
/// models). Falls back to steepest descent `-g` when nothing works.
fn newton_direction(ev: &Eval, m: usize, d: &mut [f64; MM]) {
    let scale = (0..m).fold(0.0f64, |s, i| if ev.h[i][i] > s { ev.h[i][i] } else { s });
    let base = if scale > 0.0 { scale } else { 1.0 };
    let eps = base * 1e-13;
    let mut l = [[0.0f64; MM]; MM];
    let mut damping = 0.0f64;
    for _ in 0..30 {
        if cholesky(&ev.h, damping, m, eps, &mut l) {
            // L y = -g, then L^T d = y.
            let mut y = [0.0f64; MM];
            for i in 0..m {
                let mut v = -ev.g[i];
                for k in 0..i {
                    v -= l[i][k] * y[k];
                }
                y[i] = v / l[i][i];
            }
            for i in (0..m).rev() {
                let mut v = y[i];
                for k in i + 1..m {
                    v -= l[k][i] * d[k];
                }
                d[i] = v / l[i][i];
            }
            if d[..m].iter().all(|v| v.is_finite()) {
                return;
            }
        }
        damping = if damping == 0.0 {
            base * 1e-10
        } else {
            damping * 10.0
        };
    }
    for i in 0..m {
        d[i] = -ev.g[i];
    }
}

/// Fits signed log-linear coefficients `c` maximizing the held-out
/// likelihood of `P_c = softmax_v(sum_m c_m z_m / T_m)` at the targets, by
/// Newton's method with a backtracking (Armijo) line search.
///
/// The mean negative log-likelihood
/// `NLL(c) = (1/B) sum_b [ln sum_v exp(sum_m c_m x_m(v)) - sum_m c_m x_m(y_b)]`
/// (features `x_m = z_m / T_m` of row `b`) is convex in `c`: its Hessian
/// `H_mk = (1/B) sum_b Cov_{P_c}(x_m, x_k)` is a mean of covariance
/// matrices. The gradient is `g_m = (1/B) sum_b (E_{P_c}[x_m] - x_m(y_b))`.
/// With [`NewtonOptions::l2`] the objective is `NLL(c) + l2 |c|^2 / 2`
/// (gradient `+ l2 c`, Hessian `+ l2 I`, strictly convex). Each step solves
/// `H d = -g` by Cholesky; when `H` is not positive definite (collinear
/// models, e.g. two identical ones) a small damping `lambda I` is added. The
/// step `c + t d` takes the largest `t` in `1, 1/2, 1/4, ...` with sufficient
/// decrease, so the objective never increases across accepted steps. Every
/// evaluation (objective, gradient and Hessian together) is one pass over
/// all logits, `f64` throughout.
///
/// The returned coefficients are `lambda` for
/// [`Config::log_linear`](crate::ensemble::Config::log_linear) with the same
/// models (and temperatures) and `T_out = 1`.
///
/// - `models`: at most [`MAX_NEWTON_MODELS`], `B = targets.len()` rows each.
///   The combination is over the tokens every model covers, `v < V' =
///   min_m V_m` (tokens beyond a model's vocabulary are masked in a
///   log-linear combination); every target must be below `V'`. Logits must
///   be finite on those tokens: masks (`-inf`) make the objective
///   non-smooth, so they are refused, as NaN is.
/// - `initial`: starting coefficients (`M` finite values), or `None` for
///   `1/M` each ("averaging logits"). The problem is convex: any start
///   reaches the optimum.
/// - `coefficients` receives the `M` fitted coefficients.
///
/// When no step decreases the objective any more (rounding), the function
/// stops with the current coefficients; `converged` then says whether the
/// gradient reached the tolerance. If one model predicts every target
/// perfectly the optimum is at infinity and the iteration cap stops it.
///
/// Errors (checked before anything is written): [`Error::Empty`] (`models`,
/// `targets`, `models.logits.len` for a model with no token),
/// [`Error::TooLarge`] (`models` beyond [`MAX_NEWTON_MODELS`]),
/// [`Error::LengthMismatch`] (`models.logits.rows`, `coefficients`,
/// `initial`), [`Error::IndexOutOfBounds`] (`targets`, `index` the row,
/// `bound = V'`), [`Error::NonFinite`] (`models.temperature`, `initial`,
/// `opts.l2`, `opts.tolerance`; `models.logits` with `index` the first row
/// holding a NaN or infinite logit), [`Error::OutOfRange`]
/// (`models.temperature`, negative `opts.l2` or `opts.tolerance`).
///
/// ```
/// use medley_core::learn::{fit_log_linear_newton, NewtonOptions};
/// use medley_core::ensemble::Model;
/// use medley_core::Rows;
/// // Model a is sharp and right; model b is a noisy copy.
/// let a = [4.0f32, 0.0, 0.0,  0.0, 4.0, 0.0,  0.0, 0.0, 4.0,  4.0, 0.0, 0.0];
/// let b = [1.0f32, 0.0, 2.0,  0.0, 1.0, 0.0,  1.0, 0.0, 1.0,  1.0, 1.0, 0.0];
/// let models = [Model::new(Rows::dense(&a, 4, 3)?), Model::new(Rows::dense(&b, 4, 3)?)];
/// let targets = [0u32, 1, 2, 1];
/// let mut c = [0.0f32; 2];
/// let r = fit_log_linear_newton(&models, &targets, None, &NewtonOptions::default(), &mut c)?;
/// assert!(r.converged && r.nll_after <= r.nll_before);
/// # Ok::<(), medley_core::Error>(())
/// ```
pub fn fit_log_linear_newton(
    models: &[Model<'_>],
    targets: &[u32],
    initial: Option<&[f32]>,
    opts: &NewtonOptions,
    coefficients: &mut [f32],
) -> Result<NewtonReport, Error> {
    let rows = targets.len();
    let inv_t_all = check_models(models, rows, MAX_NEWTON_MODELS)?;
    let m = models.len();
    ensure(rows > 0, Error::Empty { arg: "targets" })?;
    let vocab = models.iter().map(|md| md.logits.len()).min().unwrap_or(0);
    ensure(
        vocab > 0,
        Error::Empty {
            arg: "models.logits.len",
        },
    )?;
    check_targets(targets, vocab)?;
    ensure_len("coefficients", m, coefficients.len())?;
    for (arg, v) in [("opts.l2", opts.l2), ("opts.tolerance", opts.tolerance)] {
        ensure(v.is_finite(), Error::NonFinite { arg, index: 0 })?;
        ensure(v >= 0.0, Error::OutOfRange { arg, index: 0 })?;
    }
    let mut c = [0.0f64; MM];
    match initial {
        None => c[..m].fill(1.0 / m as f64),
        Some(init) => {
            ensure_len("initial", m, init.len())?;
            for (i, (d, &x)) in c.iter_mut().zip(init).enumerate() {
                ensure(
                    x.is_finite(),
                    Error::NonFinite {
                        arg: "initial",
                        index: i,
                    },
                )?;
                *d = x as f64;
            }
        }
    }
    let mut inv_t = [0.0f32; MM];
    inv_t.copy_from_slice(&inv_t_all[..MM]);
    let p = Problem {
        models,
        inv_t,
        targets,
        vocab,
        l2: opts.l2,
    };

    let mut cur = Eval::ZERO;
    let mut trial = Eval::ZERO;
    let mut c_try = [0.0f64; MM];
    let mut d = [0.0f64; MM];
    // The first pass reads every logit used: non-finite ones fail here,
    // before anything is written.
    crate::simd::dispatch(
        #[inline(always)]
        || p.eval(&c[..m], &mut cur),
    )
    .map_err(|row| Error::NonFinite {
        arg: "models.logits",
        index: row,
    })?;
    let nll_before = cur.nll;
    let (mut iterations, mut converged) = (0usize, false);
    loop {
        if cur.grad_norm(m) <= opts.tolerance {
            converged = true;
            break;
        }
        if iterations >= opts.max_iterations {
            break;
        }
        newton_direction(&cur, m, &mut d);
        let mut slope: f64 = (0..m).map(|i| cur.g[i] * d[i]).sum();
        if !(slope < 0.0) {
            // Not a descent direction (rounding): steepest descent instead.
            for i in 0..m {
                d[i] = -cur.g[i];
            }
            slope = -(0..m).map(|i| cur.g[i] * cur.g[i]).sum::<f64>();
        }
        let mut t = 1.0f64;
        let mut accepted = false;
        for _ in 0..HALVINGS {
            for i in 0..m {
                c_try[i] = c[i] + t * d[i];
            }
            // Same logits as the first pass: cannot fail.
            let ok = crate::simd::dispatch(
                #[inline(always)]
                || p.eval(&c_try[..m], &mut trial),
            )
            .is_ok();
            if ok && trial.obj <= cur.obj + ARMIJO * t * slope {
                accepted = true;
                break;
            }
            t *= 0.5;
        }
        if !accepted {
            break;
        }
        c[..m].copy_from_slice(&c_try[..m]);
        core::mem::swap(&mut cur, &mut trial);
        iterations += 1;
    }
    for (o, &x) in coefficients.iter_mut().zip(&c[..m]) {
        *o = x as f32;
    }
    Ok(NewtonReport {
        iterations,
        nll_before,
        nll_after: cur.nll,
        gradient_norm: cur.grad_norm(m),
        converged,
    })
}
