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


void test_merge_cpu() { test_ties_cpu(); }
