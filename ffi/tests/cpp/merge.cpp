// The merge methods of the C API (medley_merge_*), each checked against a
// double-precision reference computed here with plain loops.
#include "common.h"

// ---------------------------------------------------------------------------
// TIES merging.

// TIES of one tensor, element by element (mergekit's definition): trim each
// task vector to its floor(density * n) largest magnitudes (ties to the
// lower index), elect a sign per element from the votes, sum the agreeing
// weighted deltas and divide by the agreeing weights (or count).
static std::vector<double> reference_ties(const std::vector<float> &base, const std::vector<std::vector<float>> &xs,
                                          const float *w, const double *density, bool weighted_votes,
                                          bool count_divisor) {
  const size_t n = base.size(), m = xs.size();
  std::vector<std::vector<float>> trimmed(m, std::vector<float>(n, 0.0f));
  for (size_t i = 0; i < m; ++i) {
    std::vector<float> delta(n);
    for (size_t j = 0; j < n; ++j) delta[j] = xs[i][j] - base[j];
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&delta](size_t a, size_t b) { return std::fabs(delta[a]) > std::fabs(delta[b]); });
    size_t keep = (size_t)std::floor(density[i] * (double)n);
    for (size_t r = 0; r < keep; ++r) trimmed[i][order[r]] = delta[order[r]];
  }
  std::vector<double> out(n);
  for (size_t j = 0; j < n; ++j) {
    double votes = 0;
    for (size_t i = 0; i < m; ++i) votes += (weighted_votes ? w[i] : 1.0) * trimmed[i][j];
    double sign = votes >= 0 ? 1.0 : -1.0, sum = 0, div = 0;
    for (size_t i = 0; i < m; ++i) {
      double v = (weighted_votes ? w[i] : 1.0) * trimmed[i][j];
      if (v * sign > 0) {
        sum += w[i] * (double)trimmed[i][j];
        div += count_divisor ? 1.0 : w[i];
      }
    }
    out[j] = base[j] + sum / (div == 0 ? 1.0 : div);
  }
  return out;
}

static void test_ties_cpu() {
  const size_t n = 96, m = 3;
  std::vector<float> base(n);
  std::vector<std::vector<float>> xs(m, std::vector<float>(n));
  uint32_t s = 777;
  auto next = [&s]() {
    s = s * 1664525u + 1013904223u;
    return ((s >> 8) & 0xffff) / 65536.0f - 0.5f;
  };
  for (size_t j = 0; j < n; ++j) base[j] = next();
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < n; ++j) xs[i][j] = base[j] + next() * (float)(i + 1);
  const float w[3] = {0.5f, 0.3f, 0.2f};
  const double density[3] = {0.5, 0.25, 1.0};
  medley_merge_model models[3];
  for (size_t i = 0; i < m; ++i) models[i] = medley_merge_model{xs[i].data(), n, w[i], density[i]};
  for (int paper = 0; paper < 2; ++paper) {
    medley_ties_options opts = medley_init(paper ? medley_ties_options_init_paper : medley_ties_options_init);
    size_t scratch_len = 0;
    CHECK_STATUS(medley_merge_ties_scratch_len(models, m, n, &opts, &scratch_len), MEDLEY_STATUS_OK);
    std::vector<uint32_t> scratch(scratch_len);
    std::vector<float> out(n, 42.0f);
    CHECK_STATUS(medley_merge_ties(models, m, base.data(), n, MEDLEY_DTYPE_F32, &opts, out.data(), n,
                                   MEDLEY_DTYPE_F32, scratch.data(), scratch.size()),
                 MEDLEY_STATUS_OK);
    std::vector<double> want = reference_ties(base, xs, w, density, !paper, paper);
    for (size_t j = 0; j < n; ++j)
      CHECK(close_to(out[j], want[j], 1e-6, 1e-6), "TIES (%s) element %zu: %.9g, want %.9g",
            paper ? "paper" : "mergekit", j, out[j], want[j]);
  }
  // Failures leave the output untouched: density 0, a short scratch.
  medley_ties_options opts = medley_init(medley_ties_options_init);
  std::vector<float> out(n, 42.0f);
  std::vector<uint32_t> scratch(4);
  medley_merge_model bad[3] = {models[0], models[1], models[2]};
  bad[2].density = 0.0;
  CHECK_STATUS(medley_merge_ties(bad, m, base.data(), n, MEDLEY_DTYPE_F32, &opts, out.data(), n, MEDLEY_DTYPE_F32,
                                 scratch.data(), scratch.size()),
               MEDLEY_STATUS_BAD_PARAMETER);
  CHECK_STATUS(medley_merge_ties(models, m, base.data(), n, MEDLEY_DTYPE_F32, &opts, out.data(), n,
                                 MEDLEY_DTYPE_F32, scratch.data(), scratch.size()),
               MEDLEY_STATUS_BAD_SHAPE);
  for (float x : out) CHECK(x == 42.0f, "TIES output written by a failed call");
  std::printf("cpu: TIES merge (mergekit and paper variants) matches the C++ reference\n");
}

// ---------------------------------------------------------------------------
// Every other merge method, each against a double-precision reference.

namespace {

struct MergeData {
  std::vector<float> base;
  std::vector<std::vector<float>> xs;
};

MergeData merge_data(size_t m, size_t n, uint32_t seed) {
  MergeData d;
  uint32_t s = seed;
  auto next = [&s]() {
    s = s * 1664525u + 1013904223u;
    return ((s >> 8) & 0xffff) / 65536.0f - 0.5f;
  };
  d.base.resize(n);
  for (auto &b : d.base) b = next();
  d.xs.assign(m, std::vector<float>(n));
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < n; ++j) d.xs[i][j] = d.base[j] + 0.2f * next() + 0.05f * (float)i;
  return d;
}

std::vector<medley_merge_model> with_weights(const MergeData &d, const std::vector<float> &w) {
  std::vector<medley_merge_model> v;
  for (size_t i = 0; i < d.xs.size(); ++i) v.push_back(medley_merge_model{d.xs[i].data(), d.xs[i].size(), w[i], 1.0});
  return v;
}

std::vector<medley_merge_tensor> tensors_of(const MergeData &d, size_t lo, size_t hi) {
  std::vector<medley_merge_tensor> v;
  for (const auto &x : d.xs) v.push_back(medley_merge_tensor{x.data() + lo, hi - lo});
  return v;
}

double dot(const std::vector<double> &a, const std::vector<double> &b) {
  double s = 0;
  for (size_t j = 0; j < a.size(); ++j) s += a[j] * b[j];
  return s;
}

std::vector<double> as_double(const std::vector<float> &v) { return std::vector<double>(v.begin(), v.end()); }

std::vector<double> delta_of(const std::vector<float> &x, const std::vector<float> &b) {
  std::vector<double> d(x.size());
  for (size_t j = 0; j < x.size(); ++j) d[j] = (double)x[j] - (double)b[j];
  return d;
}

// Checks out[j] against want[j] for every j; `what` names the method.
void check_close(const char *what, const std::vector<float> &out, const std::vector<double> &want, double tol) {
  bool ok = out.size() == want.size();
  size_t bad = 0;
  for (size_t j = 0; ok && j < out.size(); ++j)
    if (!close_to(out[j], want[j], tol, tol)) {
      ok = false;
      bad = j;
    }
  CHECK(ok, "%s element %zu: %.9g, want %.9g", what, bad, ok ? 0.0 : (double)out[bad], ok ? 0.0 : want[bad]);
}

bool untouched(const std::vector<float> &v) {
  for (float x : v)
    if (x != 42.0f) return false;
  return true;
}

// Indices of |v| in descending order, ties to the lower index.
std::vector<size_t> by_magnitude(const std::vector<double> &v) {
  std::vector<size_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&v](size_t a, size_t b) { return std::fabs(v[a]) > std::fabs(v[b]); });
  return order;
}

// Streams a merge: statistics passes in chunks, then apply in reverse order.
std::vector<float> run_stream(medley_merge_stream *h, const MergeData &d, bool with_base, size_t chunk) {
  const size_t n = d.base.size();
  uint32_t needs = 1;
  int passes = 0;
  while (medley_merge_stream_needs_pass(h, &needs) == MEDLEY_STATUS_OK && needs && passes++ < 10) {
    for (size_t lo = 0; lo < n; lo += chunk) {
      size_t hi = std::min(n, lo + chunk);
      auto c = tensors_of(d, lo, hi);
      CHECK_STATUS(medley_merge_stream_feed(h, c.data(), c.size(), with_base ? d.base.data() + lo : nullptr,
                                            with_base ? hi - lo : 0, MEDLEY_DTYPE_F32),
                   MEDLEY_STATUS_OK);
    }
    CHECK_STATUS(medley_merge_stream_end_pass(h), MEDLEY_STATUS_OK);
  }
  std::vector<float> out(n, 42.0f);
  size_t last = n == 0 ? 0 : ((n - 1) / chunk) * chunk;
  for (size_t lo = last + chunk; lo-- > 0;) {
    if (lo % chunk) continue;
    size_t hi = std::min(n, lo + chunk);
    auto c = tensors_of(d, lo, hi);
    CHECK_STATUS(medley_merge_stream_apply(h, c.data(), c.size(), with_base ? d.base.data() + lo : nullptr,
                                           with_base ? hi - lo : 0, MEDLEY_DTYPE_F32, lo, out.data() + lo, hi - lo,
                                           MEDLEY_DTYPE_F32),
                 MEDLEY_STATUS_OK);
  }
  CHECK_STATUS(medley_merge_stream_destroy(h), MEDLEY_STATUS_OK);
  return out;
}

bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

static void test_linear_cpu() {
  const size_t n = 64;
  MergeData d = merge_data(3, n, 11);
  std::vector<float> w = {0.5f, 1.5f, -0.25f};
  auto models = with_weights(d, w);
  for (int normalize = 0; normalize < 2; ++normalize) {
    std::vector<float> out(n, 42.0f);
    CHECK_STATUS(medley_merge_linear(models.data(), 3, MEDLEY_DTYPE_F32, normalize, out.data(), n, MEDLEY_DTYPE_F32),
                 MEDLEY_STATUS_OK);
    std::vector<double> want(n);
    double ws = 0;
    for (float x : w) ws += x;
    for (size_t j = 0; j < n; ++j) {
      double s = 0;
      for (size_t i = 0; i < 3; ++i) s += (double)w[i] * d.xs[i][j];
      want[j] = normalize ? s / ws : s;
    }
    check_close("linear", out, want, 2e-6);
  }
  std::vector<float> out(n, 42.0f);
  CHECK_STATUS(medley_merge_linear(models.data(), 3, MEDLEY_DTYPE_F32, 1, out.data(), n - 1, MEDLEY_DTYPE_F32),
               MEDLEY_STATUS_BAD_SHAPE);
  CHECK_STATUS(medley_merge_linear(models.data(), 3, 7, 1, out.data(), n, MEDLEY_DTYPE_F32),
               MEDLEY_STATUS_BAD_PARAMETER);
  CHECK(untouched(out), "linear output written by a failed call");
  std::printf("cpu: linear merge matches the C++ reference\n");
}

static void test_gta_cpu() {
  const size_t n = 200, m = 3;
  MergeData d = merge_data(m, n, 21);
  const float w[3] = {1.0f, 0.6f, -0.3f};
  const double dens[3] = {0.5, 0.3, 0.8}, gamma[3] = {0.05, 0.1, 0.0};
  std::vector<medley_gta_model> models;
  for (size_t i = 0; i < m; ++i) models.push_back(medley_gta_model{d.xs[i].data(), n, w[i], dens[i], gamma[i], 0.1});
  std::vector<std::vector<double>> deltas;
  for (size_t i = 0; i < m; ++i) deltas.push_back(delta_of(d.xs[i], d.base));
  auto run = [&](const medley_gta_options &o, const std::vector<medley_gta_model> &ms) {
    size_t len = 0;
    CHECK_STATUS(medley_merge_gta_scratch_len(ms.data(), ms.size(), n, &o, &len), MEDLEY_STATUS_OK);
    std::vector<uint32_t> scratch(len);
    std::vector<float> out(n, 42.0f);
    CHECK_STATUS(medley_merge_gta(ms.data(), ms.size(), d.base.data(), n, MEDLEY_DTYPE_F32, &o, out.data(), n,
                                  MEDLEY_DTYPE_F32, scratch.data(), len),
                 MEDLEY_STATUS_OK);
    return out;
  };
  // Task arithmetic: base + lambda * sum w_i delta_i.
  {
    medley_gta_options o = medley_init(medley_gta_options_init);
    o.lambda = 0.8f;
    std::vector<double> want(n);
    for (size_t j = 0; j < n; ++j) {
      double s = 0;
      for (size_t i = 0; i < m; ++i) s += w[i] * deltas[i][j];
      want[j] = d.base[j] + 0.8 * s;
    }
    check_close("task arithmetic", run(o, models), want, 2e-6);
  }
  // Breadcrumbs: drop the floor(gamma n) largest, keep the next
  // floor(density n), no consensus, not normalized.
  {
    medley_gta_options o;
    std::memset(&o, 0, sizeof o);
    CHECK_STATUS(medley_gta_options_init_preset(&o, sizeof o, MEDLEY_GTA_PRESET_BREADCRUMBS), MEDLEY_STATUS_OK);
    std::vector<double> want(d.base.begin(), d.base.end());
    for (size_t i = 0; i < m; ++i) {
      auto order = by_magnitude(deltas[i]);
      size_t keep = (size_t)std::floor(dens[i] * n), top = (size_t)std::floor(gamma[i] * n);
      top = std::min(top, n - keep);
      for (size_t r = top; r < top + keep; ++r) want[order[r]] += w[i] * deltas[i][order[r]];
    }
    check_close("breadcrumbs", run(o, models), want, 2e-6);
  }
  // DARE and DELLA (one model, L1 rescale, no normalization): every element
  // is the base or base + s * delta with s = |delta|_1 / |kept delta|_1,
  // about a density fraction kept.
  for (int della = 0; della < 2; ++della) {
    const size_t big = 4000;
    MergeData one = merge_data(1, big, 31);
    std::vector<double> delta = delta_of(one.xs[0], one.base);
    std::vector<medley_gta_model> ms = {medley_gta_model{one.xs[0].data(), big, 1.0f, 0.5, 0.0, 0.2}};
    medley_gta_options o;
    std::memset(&o, 0, sizeof o);
    CHECK_STATUS(medley_gta_options_init_preset(&o, sizeof o, della ? MEDLEY_GTA_PRESET_DELLA_LINEAR
                                                                    : MEDLEY_GTA_PRESET_DARE_LINEAR),
                 MEDLEY_STATUS_OK);
    o.seed = 1234;
    size_t len = 0;
    CHECK_STATUS(medley_merge_gta_scratch_len(ms.data(), 1, big, &o, &len), MEDLEY_STATUS_OK);
    std::vector<uint32_t> scratch(len);
    std::vector<float> out(big, 42.0f);
    CHECK_STATUS(medley_merge_gta(ms.data(), 1, one.base.data(), big, MEDLEY_DTYPE_F32, &o, out.data(), big,
                                  MEDLEY_DTYPE_F32, scratch.data(), len),
                 MEDLEY_STATUS_OK);
    double l1 = 0, kept_l1 = 0;
    size_t kept = 0;
    std::vector<bool> k(big);
    for (size_t j = 0; j < big; ++j) {
      l1 += std::fabs(delta[j]);
      k[j] = out[j] != one.base[j];
      if (k[j]) {
        kept_l1 += std::fabs(delta[j]);
        ++kept;
      }
    }
    double sc = l1 / kept_l1;
    std::vector<double> want(big);
    for (size_t j = 0; j < big; ++j) want[j] = one.base[j] + (k[j] ? sc * delta[j] : 0.0);
    check_close(della ? "DELLA (given its mask)" : "DARE (given its mask)", out, want, 1e-5);
    CHECK(kept > big * 0.45 && kept < big * 0.55, "%s kept %zu of %zu at density 0.5", della ? "DELLA" : "DARE", kept,
          big);
  }
  // TIES through the general entry point equals medley_merge_ties.
  {
    medley_gta_options o;
    std::memset(&o, 0, sizeof o);
    CHECK_STATUS(medley_gta_options_init_preset(&o, sizeof o, MEDLEY_GTA_PRESET_TIES), MEDLEY_STATUS_OK);
    std::vector<float> out = run(o, models);
    medley_ties_options to = medley_init(medley_ties_options_init);
    std::vector<medley_merge_model> tm;
    for (size_t i = 0; i < m; ++i) tm.push_back(medley_merge_model{d.xs[i].data(), n, w[i], dens[i]});
    size_t len = 0;
    CHECK_STATUS(medley_merge_ties_scratch_len(tm.data(), m, n, &to, &len), MEDLEY_STATUS_OK);
    std::vector<uint32_t> scratch(len);
    std::vector<float> t(n, 0.0f);
    CHECK_STATUS(medley_merge_ties(tm.data(), m, d.base.data(), n, MEDLEY_DTYPE_F32, &to, t.data(), n,
                                   MEDLEY_DTYPE_F32, scratch.data(), len),
                 MEDLEY_STATUS_OK);
    CHECK(same_bits(out, t), "medley_merge_gta (TIES preset) differs from medley_merge_ties");
    // Streamed: the same bits for chunks of 48.
    medley_merge_stream *h = nullptr;
    CHECK_STATUS(medley_merge_stream_new_gta(models.data(), m, n, &o, &h), MEDLEY_STATUS_OK);
    if (h) CHECK(same_bits(run_stream(h, d, true, 48), out), "streamed TIES differs from the one-shot merge");
    // Misuse: apply before the statistics, feed a short chunk.
    CHECK_STATUS(medley_merge_stream_new_gta(models.data(), m, n, &o, &h), MEDLEY_STATUS_OK);
    std::vector<float> o2(n, 42.0f);
    auto c = tensors_of(d, 0, n);
    CHECK_STATUS(medley_merge_stream_apply(h, c.data(), m, d.base.data(), n, MEDLEY_DTYPE_F32, 0, o2.data(), n,
                                           MEDLEY_DTYPE_F32),
                 MEDLEY_STATUS_UNSUPPORTED);
    CHECK_STATUS(medley_merge_stream_feed(h, c.data(), m, d.base.data(), n - 1, MEDLEY_DTYPE_F32),
                 MEDLEY_STATUS_BAD_SHAPE);
    CHECK_STATUS(medley_merge_stream_destroy(h), MEDLEY_STATUS_OK);
    CHECK(untouched(o2), "stream output written by a failed apply");
  }
  // Failures leave the output untouched.
  medley_gta_options o = medley_init(medley_gta_options_init);
  std::vector<float> out(n, 42.0f);
  medley_gta_options bad = o;
  bad.sparsify = 17;
  CHECK_STATUS(medley_merge_gta(models.data(), m, d.base.data(), n, MEDLEY_DTYPE_F32, &bad, out.data(), n,
                                MEDLEY_DTYPE_F32, nullptr, 0),
               MEDLEY_STATUS_BAD_PARAMETER);
  bad = o;
  bad.struct_size = 3;
  CHECK_STATUS(medley_merge_gta(models.data(), m, d.base.data(), n, MEDLEY_DTYPE_F32, &bad, out.data(), n,
                                MEDLEY_DTYPE_F32, nullptr, 0),
               MEDLEY_STATUS_STRUCT_SIZE);
  CHECK_STATUS(medley_merge_gta(models.data(), m, out.data(), n, MEDLEY_DTYPE_F32, &o, out.data(), n,
                                MEDLEY_DTYPE_F32, nullptr, 0),
               MEDLEY_STATUS_OVERLAP);
  CHECK(untouched(out), "task-vector output written by a failed call");
  std::printf("cpu: task arithmetic, breadcrumbs, DARE, DELLA, TIES (one-shot and streamed) match the C++ reference\n");
}

// SLERP coefficients of two vectors (mergekit's slerp), in double.
static std::vector<double> reference_slerp(const std::vector<double> &a, const std::vector<double> &b, double t,
                                           double threshold, double eps) {
  double na = std::sqrt(dot(a, a)), nb = std::sqrt(dot(b, b));
  double c = dot(a, b) / ((na > eps ? na : 1.0) * (nb > eps ? nb : 1.0));
  double c0, c1;
  if (std::fabs(c) > threshold) {
    c0 = 1 - t;
    c1 = t;
  } else {
    double th = std::acos(c), s = std::sin(th);
    c0 = std::sin((1 - t) * th) / s;
    c1 = std::sin(t * th) / s;
  }
  std::vector<double> out(a.size());
  for (size_t j = 0; j < a.size(); ++j) out[j] = c0 * a[j] + c1 * b[j];
  return out;
}

static void test_sphere_cpu() {
  const size_t n = 120;
  MergeData d = merge_data(3, n, 41);
  std::vector<double> x0 = as_double(d.xs[0]), x1 = as_double(d.xs[1]), x2 = as_double(d.xs[2]);
  // SLERP, one-shot and streamed.
  medley_slerp_options so = medley_init(medley_slerp_options_init);
  so.t = 0.3f;
  std::vector<float> out(n, 42.0f);
  CHECK_STATUS(medley_merge_slerp(d.xs[0].data(), n, d.xs[1].data(), n, MEDLEY_DTYPE_F32, &so, out.data(), n,
                                  MEDLEY_DTYPE_F32),
               MEDLEY_STATUS_OK);
  std::vector<double> want = reference_slerp(x0, x1, 0.3, 0.9995, 1e-8);
  check_close("SLERP", out, want, 2e-6);
  MergeData two = d;
  two.xs.resize(2);
  medley_merge_stream *h = nullptr;
  CHECK_STATUS(medley_merge_stream_new_slerp(n, &so, &h), MEDLEY_STATUS_OK);
  if (h) CHECK(same_bits(run_stream(h, two, false, 50), out), "streamed SLERP differs from the one-shot merge");
  // NuSLERP (flat, on task vectors over the base).
  {
    medley_nuslerp_options no = medley_init(medley_nuslerp_options_init);
    std::vector<float> w = {0.25f, 0.75f};
    auto ms = with_weights(two, w);
    std::vector<float> o(n, 42.0f);
    size_t sl = 7;
    CHECK_STATUS(medley_merge_nuslerp_scratch_len(n, &no, &sl), MEDLEY_STATUS_OK);
    CHECK(sl == 0, "flat NuSLERP needs no scratch, got %zu", sl);
    CHECK_STATUS(medley_merge_nuslerp(ms.data(), 2, d.base.data(), n, MEDLEY_DTYPE_F32, &no, o.data(), n,
                                      MEDLEY_DTYPE_F32, nullptr, 0),
                 MEDLEY_STATUS_OK);
    std::vector<double> v0 = delta_of(d.xs[0], d.base), v1 = delta_of(d.xs[1], d.base);
    double t = 0.75 / 1.0;
    double n0 = std::max(std::sqrt(dot(v0, v0)), 1e-7), n1 = std::max(std::sqrt(dot(v1, v1)), 1e-7);
    double c = std::max(-1.0, std::min(1.0, dot(v0, v1) / (n0 * n1)));
    double th = std::acos(c), s = std::sin(th);
    std::vector<double> r(n);
    for (size_t j = 0; j < n; ++j)
      r[j] = d.base[j] + std::sin((1 - t) * th) / s * v0[j] + std::sin(t * th) / s * v1[j];
    check_close("NuSLERP", o, r, 2e-6);
    CHECK_STATUS(medley_merge_stream_new_nuslerp(w.data(), 2, 1, n, &no, &h), MEDLEY_STATUS_OK);
    if (h) CHECK(same_bits(run_stream(h, two, true, 32), o), "streamed NuSLERP differs from the one-shot merge");
  }
  // Multi-SLERP (no base): out = m * sum a_i |x_i|.
  std::vector<float> w3 = {0.2f, 0.5f, 0.3f};
  auto ms = with_weights(d, w3);
  {
    medley_multislerp_options mo = medley_init(medley_multislerp_options_init);
    std::vector<float> o(n, 42.0f);
    CHECK_STATUS(medley_merge_multislerp(ms.data(), 3, nullptr, 0, MEDLEY_DTYPE_F32, &mo, o.data(), n,
                                         MEDLEY_DTYPE_F32),
                 MEDLEY_STATUS_OK);
    const std::vector<double> *xs[3] = {&x0, &x1, &x2};
    std::vector<double> mean(n, 0.0);
    double scale = 0;
    for (int i = 0; i < 3; ++i) {
      double nrm = std::sqrt(dot(*xs[i], *xs[i]));
      scale += w3[i] * nrm;
      for (size_t j = 0; j < n; ++j) mean[j] += w3[i] * (*xs[i])[j] / (nrm + 1e-8);
    }
    double mn = std::sqrt(dot(mean, mean));
    std::vector<double> r(n);
    for (size_t j = 0; j < n; ++j) r[j] = mean[j] / mn * scale;
    check_close("multi-SLERP", o, r, 2e-6);
    CHECK_STATUS(medley_merge_stream_new_multislerp(w3.data(), 3, 0, n, &mo, &h), MEDLEY_STATUS_OK);
    if (h) CHECK(same_bits(run_stream(h, d, false, 40), o), "streamed multi-SLERP differs from the one-shot merge");
  }
  // Karcher mean: the fixed-point iteration on the full vectors.
  {
    medley_karcher_options ko = medley_init(medley_karcher_options_init);
    std::vector<float> o(n, 42.0f);
    CHECK_STATUS(medley_merge_karcher(ms.data(), 3, MEDLEY_DTYPE_F32, &ko, o.data(), n, MEDLEY_DTYPE_F32),
                 MEDLEY_STATUS_OK);
    const std::vector<double> *xs[3] = {&x0, &x1, &x2};
    std::vector<std::vector<double>> u(3, std::vector<double>(n));
    double a[3], norms[3], scale = 0;
    for (int i = 0; i < 3; ++i) {
      a[i] = w3[i] / 1.0;
      norms[i] = std::sqrt(dot(*xs[i], *xs[i]));
      scale += a[i] * norms[i];
      for (size_t j = 0; j < n; ++j) u[i][j] = (*xs[i])[j] / norms[i];
    }
    std::vector<double> mu(n, 0.0);
    for (int i = 0; i < 3; ++i)
      for (size_t j = 0; j < n; ++j) mu[j] += a[i] * u[i][j];
    double l = std::sqrt(dot(mu, mu));
    for (auto &x : mu) x /= l;
    for (int it = 0; it < 10; ++it) {
      std::vector<double> T(n, 0.0);
      for (int i = 0; i < 3; ++i) {
        double c = std::max(-1.0, std::min(1.0, dot(mu, u[i])));
        double th = std::acos(c);
        if (th < 1e-5) continue;
        for (size_t j = 0; j < n; ++j) T[j] += a[i] * th / std::sin(th) * (u[i][j] - c * mu[j]);
      }
      double tn = std::sqrt(dot(T, T));
      if (tn < 1e-5) break;
      for (size_t j = 0; j < n; ++j) mu[j] = std::cos(tn) * mu[j] + std::sin(tn) * T[j] / tn;
      l = std::sqrt(dot(mu, mu));
      for (auto &x : mu) x /= l;
    }
    std::vector<double> r(n);
    for (size_t j = 0; j < n; ++j) r[j] = scale * mu[j];
    check_close("Karcher mean", o, r, 1e-5);
    CHECK_STATUS(medley_merge_stream_new_karcher(w3.data(), 3, n, &ko, &h), MEDLEY_STATUS_OK);
    if (h) CHECK(same_bits(run_stream(h, d, false, 64), o), "streamed Karcher mean differs from the one-shot merge");
  }
  // Failures leave the output untouched.
  std::vector<float> o(n, 42.0f);
  medley_slerp_options bad = so;
  bad.dot_threshold = -1.0;
  CHECK_STATUS(medley_merge_slerp(d.xs[0].data(), n, d.xs[1].data(), n, MEDLEY_DTYPE_F32, &bad, o.data(), n,
                                  MEDLEY_DTYPE_F32),
               MEDLEY_STATUS_BAD_PARAMETER);
  medley_nuslerp_options no = medley_init(medley_nuslerp_options_init);
  no.layout = 9;
  CHECK_STATUS(medley_merge_nuslerp(ms.data(), 2, nullptr, 0, MEDLEY_DTYPE_F32, &no, o.data(), n, MEDLEY_DTYPE_F32,
                                    nullptr, 0),
               MEDLEY_STATUS_BAD_PARAMETER);
  medley_multislerp_options mo = medley_init(medley_multislerp_options_init);
  CHECK_STATUS(medley_merge_multislerp(ms.data(), 3, nullptr, 0, MEDLEY_DTYPE_F32, &mo, o.data(), n + 1,
                                       MEDLEY_DTYPE_F32),
               MEDLEY_STATUS_BAD_SHAPE);
  medley_karcher_options ko = medley_init(medley_karcher_options_init);
  CHECK_STATUS(medley_merge_karcher(ms.data(), 3, MEDLEY_DTYPE_F32, &ko, (float *)((char *)o.data() + 1), n - 1,
                                    MEDLEY_DTYPE_F32),
               MEDLEY_STATUS_MISALIGNED);
  CHECK(untouched(o), "spherical output written by a failed call");
  std::printf("cpu: SLERP, NuSLERP, multi-SLERP, Karcher (one-shot and streamed) match the C++ reference\n");
}

static void test_stock_sce_cpu() {
  const size_t n = 128, m = 3;
  MergeData d = merge_data(m, n, 51);
  auto ts = tensors_of(d, 0, n);
  std::vector<std::vector<double>> deltas;
  for (size_t i = 0; i < m; ++i) deltas.push_back(delta_of(d.xs[i], d.base));
  // Model Stock, whole tensor.
  {
    medley_stock_options so = medley_init(medley_stock_options_init);
    std::vector<float> out(n, 42.0f);
    CHECK_STATUS(medley_merge_model_stock(ts.data(), m, d.base.data(), n, MEDLEY_DTYPE_F32, &so, out.data(), n,
                                          MEDLEY_DTYPE_F32),
                 MEDLEY_STATUS_OK);
    double cs = 0;
    int pairs = 0;
    for (size_t i = 0; i < m; ++i)
      for (size_t k = i + 1; k < m; ++k) {
        double c = dot(deltas[i], deltas[k]) /
                   std::max(std::sqrt(dot(deltas[i], deltas[i])) * std::sqrt(dot(deltas[k], deltas[k])), 1e-6);
        cs += std::max(-1.0, std::min(1.0, c));
        ++pairs;
      }
    double c = cs / pairs;
    double t = c < 0 ? 0 : m * c / (1 + (m - 1) * c);
    std::vector<double> want(n);
    for (size_t j = 0; j < n; ++j) {
      double mean = 0;
      for (size_t i = 0; i < m; ++i) mean += d.xs[i][j];
      want[j] = t * mean / m + (1 - t) * d.base[j];
    }
    check_close("Model Stock", out, want, 2e-6);
    medley_merge_stream *h = nullptr;
    CHECK_STATUS(medley_merge_stream_new_model_stock(m, n, &so, &h), MEDLEY_STATUS_OK);
    if (h) CHECK(same_bits(run_stream(h, d, true, 40), out), "streamed Model Stock differs from the one-shot merge");
    std::vector<float> o(n, 42.0f);
    CHECK_STATUS(medley_merge_model_stock(ts.data(), 1, d.base.data(), n, MEDLEY_DTYPE_F32, &so, o.data(), n,
                                          MEDLEY_DTYPE_F32),
                 MEDLEY_STATUS_UNSUPPORTED);
    CHECK(untouched(o), "Model Stock output written by a failed call");
  }
  // SCE without selection: energy weights, sum-sign election, agreeing mean.
  {
    medley_sce_options so = medley_init(medley_sce_options_init);
    size_t sl = 5;
    CHECK_STATUS(medley_merge_sce_scratch_len(m, n, &so, &sl), MEDLEY_STATUS_OK);
    std::vector<uint32_t> scratch(sl);
    std::vector<float> out(n, 42.0f);
    CHECK_STATUS(medley_merge_sce(ts.data(), m, d.base.data(), n, MEDLEY_DTYPE_F32, &so, out.data(), n,
                                  MEDLEY_DTYPE_F32, scratch.data(), sl),
                 MEDLEY_STATUS_OK);
    double e[3], es = 0;
    for (size_t i = 0; i < m; ++i) {
      e[i] = dot(deltas[i], deltas[i]) / n;
      es += e[i];
    }
    std::vector<double> want(n);
    for (size_t j = 0; j < n; ++j) {
      double v = 0;
      for (size_t i = 0; i < m; ++i) v += deltas[i][j];
      double sign = v >= 0 ? 1 : -1, num = 0, den = 0;
      for (size_t i = 0; i < m; ++i)
        if (deltas[i][j] * sign > 0) {
          num += e[i] / es * deltas[i][j];
          den += e[i] / es;
        }
      want[j] = d.base[j] + num / std::max(den, 1e-6);
    }
    check_close("SCE", out, want, 2e-6);
    medley_merge_stream *h = nullptr;
    CHECK_STATUS(medley_merge_stream_new_sce(m, n, &so, &h), MEDLEY_STATUS_OK);
    if (h) CHECK(same_bits(run_stream(h, d, true, 48), out), "streamed SCE differs from the one-shot merge");
    std::vector<float> o(n, 42.0f);
    medley_sce_options bad = so;
    bad.select_topk = 1.5;
    CHECK_STATUS(medley_merge_sce(ts.data(), m, d.base.data(), n, MEDLEY_DTYPE_F32, &bad, o.data(), n,
                                  MEDLEY_DTYPE_F32, nullptr, 0),
                 MEDLEY_STATUS_BAD_PARAMETER);
    CHECK(untouched(o), "SCE output written by a failed call");
  }
  std::printf("cpu: Model Stock and SCE (one-shot and streamed) match the C++ reference\n");
}

namespace {
// Score: minus the squared distance to the all-0.05 vector; counts calls.
float soup_score(const float *p, size_t len, void *user) {
  ++*static_cast<int *>(user);
  double s = 0;
  for (size_t j = 0; j < len; ++j) s += ((double)p[j] - 0.05) * ((double)p[j] - 0.05);
  return (float)-s;
}

double score_of(const std::vector<double> &v) {
  double s = 0;
  for (double x : v) s += (x - 0.05) * (x - 0.05);
  return -s;
}

std::vector<double> soup_of(const MergeData &d, const std::vector<bool> &sel) {
  std::vector<double> s(d.base.size(), 0.0);
  int k = 0;
  for (size_t i = 0; i < d.xs.size(); ++i)
    if (sel[i]) {
      ++k;
      for (size_t j = 0; j < s.size(); ++j) s[j] += d.xs[i][j];
    }
  for (auto &x : s) x /= k;
  return s;
}
}  // namespace

static void test_soups_cpu() {
  const size_t n = 50, m = 5;
  MergeData d = merge_data(m, n, 61);
  // Models far from and near the target, so the decisions are clear-cut.
  for (size_t i = 0; i < m; ++i)
    for (size_t j = 0; j < n; ++j) d.xs[i][j] = 0.05f + (d.xs[i][j] - d.base[j]) * (float)(1 + 3 * (i % 2));
  auto ts = tensors_of(d, 0, n);
  // Greedy: rank by own score, add while the soup's score does not drop.
  {
    std::vector<double> own(m);
    std::vector<size_t> order(m);
    for (size_t i = 0; i < m; ++i) {
      own[i] = score_of(as_double(d.xs[i]));
      order[i] = i;
    }
    std::stable_sort(order.begin(), order.end(), [&own](size_t a, size_t b) { return own[a] > own[b]; });
    std::vector<bool> sel(m, false);
    sel[order[0]] = true;
    double best = own[order[0]];
    for (size_t r = 1; r < m; ++r) {
      sel[order[r]] = true;
      double s = score_of(soup_of(d, sel));
      if (s >= best)
        best = s;
      else
        sel[order[r]] = false;
    }
    std::vector<uint8_t> got(m, 9);
    std::vector<float> soup(n, 42.0f);
    int calls = 0;
    medley_soup_report rep = medley_init(medley_soup_report_init);
    CHECK_STATUS(medley_merge_greedy_soup(ts.data(), m, MEDLEY_DTYPE_F32, nullptr, 0, soup_score, &calls, got.data(),
                                          m, soup.data(), n, &rep),
                 MEDLEY_STATUS_OK);
    size_t k = 0;
    for (size_t i = 0; i < m; ++i) {
      CHECK(got[i] == (sel[i] ? 1 : 0), "greedy soup: model %zu selected %d, want %d", i, got[i], (int)sel[i]);
      k += sel[i];
    }
    check_close("greedy soup", soup, soup_of(d, sel), 2e-6);
    CHECK(rep.ingredients == k && (int)rep.evaluations == calls && rep.evaluations == 2 * m - 1,
          "greedy soup report: %zu ingredients, %zu evaluations (%d calls)", rep.ingredients, rep.evaluations, calls);
  }
  // Pruned: from the full soup, remove one whenever the score does not drop.
  {
    std::vector<bool> sel(m, true);
    double score = score_of(soup_of(d, sel));
    size_t count = m;
    for (int pass = 0; pass < 4; ++pass) {
      bool removed = false;
      for (size_t i = 0; i < m; ++i) {
        if (!sel[i] || count == 1) continue;
        sel[i] = false;
        double s = score_of(soup_of(d, sel));
        if (s >= score) {
          score = s;
          --count;
          removed = true;
        } else {
          sel[i] = true;
        }
      }
      if (!removed) break;
    }
    std::vector<uint8_t> got(m, 9);
    std::vector<float> soup(n, 42.0f);
    int calls = 0;
    CHECK_STATUS(medley_merge_pruned_soup(ts.data(), m, MEDLEY_DTYPE_F32, 4, soup_score, &calls, got.data(), m,
                                          soup.data(), n, nullptr),
                 MEDLEY_STATUS_OK);
    for (size_t i = 0; i < m; ++i)
      CHECK(got[i] == (sel[i] ? 1 : 0), "pruned soup: model %zu selected %d, want %d", i, got[i], (int)sel[i]);
    check_close("pruned soup", soup, soup_of(d, sel), 2e-6);
  }
  // Failures: nothing written, the evaluator never called.
  std::vector<uint8_t> got(m, 9);
  std::vector<float> soup(n, 42.0f);
  int calls = 0;
  CHECK_STATUS(medley_merge_greedy_soup(ts.data(), m, MEDLEY_DTYPE_F32, nullptr, 0, nullptr, &calls, got.data(), m,
                                        soup.data(), n, nullptr),
               MEDLEY_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(medley_merge_pruned_soup(ts.data(), m, MEDLEY_DTYPE_F32, 1, soup_score, &calls, got.data(), m - 1,
                                        soup.data(), n, nullptr),
               MEDLEY_STATUS_BAD_SHAPE);
  CHECK(untouched(soup) && calls == 0 && got[0] == 9, "soup outputs written by a failed call");
  std::printf("cpu: greedy and pruned soups match the C++ reference\n");
}

void test_merge_cpu() {
  test_ties_cpu();
  test_linear_cpu();
  test_gta_cpu();
  test_sphere_cpu();
  test_stock_sce_cpu();
  test_soups_cpu();
}
