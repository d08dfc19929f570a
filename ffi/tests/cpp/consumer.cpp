// A real C++17 consumer of medley's C API (ffi/include/medley.h), linked
// against the static library libmedley_ffi.a.
//
// CPU part (runs everywhere): an ensemble combination in both modes, top-k
// gating, a TIES merge, and the error contract (status codes, names, messages, untouched
// outputs), each checked against values computed here with plain loops in
// double precision.
//
// GPU part (runs when cuInit succeeds): allocates device memory through the
// CUDA driver API (declared below: no CUDA header is needed to build this
// file), creates its own non-blocking stream, loads medley's kernels for
// that stream, runs the GPU ensemble with both kernels and with per-row
// device weights and the GPU top-k gating, and compares with the CPU
// results; checks that a bad call enqueues nothing. Prints why it was skipped otherwise (34 = the stub
// driver of a CPU-only build, 100 = no device).
//
// Compiled with -DMEDLEY_NO_CUDA (against a CPU-only library built with
// --no-default-features), the GPU part and the driver declarations are left
// out, the program needs no libcuda, and it checks medley_has_cuda() is
// false (true otherwise).
//
// Exit status 0 when every check passed. Build (see ffi/README.md):
//   c++ -std=c++17 -I ffi/include ffi/tests/cpp/consumer.cpp
//       target/debug/libmedley_ffi.a -lcuda -lpthread -ldl -lm -lrt -o consumer
// or, CPU-only:
//   c++ -std=c++17 -DMEDLEY_NO_CUDA -I ffi/include ffi/tests/cpp/consumer.cpp
//       target/debug/libmedley_ffi.a -lpthread -ldl -lm -lrt -o consumer
// Arguments are ignored (tools/device/run.sh passes --nocapture to every
// test binary it runs).

#include "common.h"

// ---------------------------------------------------------------------------
// Ensemble test data: B rows, vocabulary V, three models with their own
// strides, vocabularies and element types (model 1 is bfloat16 and covers
// only its first V1 tokens; model 2 masks some tokens with -inf).

static const size_t B = 3, V = 37, V1 = 30;
// Row strides: every row starts 16-byte aligned, so the GPU's split-row
// kernel (v2) applies.
static const size_t STRIDE0 = 40, STRIDE1 = 32, STRIDE2 = 44, OUT_STRIDE = 40;

struct EnsembleData {
  std::vector<float> m0;       // B x STRIDE0, f32
  std::vector<uint16_t> m1;    // B x STRIDE1, bf16 bits
  std::vector<float> m1_f32;   // the same values as f32 (for the GPU)
  std::vector<float> m2;       // B x STRIDE2, f32 (the last row unpadded)
  float temps[3] = {1.0f, 0.7f, 1.3f};

  EnsembleData() : m0(B * STRIDE0, 1e30f), m1(B * STRIDE1, to_bf16(1e30f)), m1_f32(B * STRIDE1, 1e30f), m2((B - 1) * STRIDE2 + V, 1e30f) {
    // Deterministic, tie-free pseudo-random logits (padding keeps 1e30,
    // which medley must never read).
    uint32_t s = 12345;
    auto next = [&s]() {
      s = s * 1664525u + 1013904223u;
      return ((s >> 8) & 0xffff) / 65536.0f * 8.0f - 4.0f;
    };
    for (size_t b = 0; b < B; ++b) {
      for (size_t v = 0; v < V; ++v) m0[b * STRIDE0 + v] = next();
      for (size_t v = 0; v < V1; ++v) {
        m1[b * STRIDE1 + v] = to_bf16(next());
        m1_f32[b * STRIDE1 + v] = from_bf16(m1[b * STRIDE1 + v]);
      }
      for (size_t v = 0; v < V; ++v) m2[b * STRIDE2 + v] = (v % 7 == 3) ? -INFINITY : next();
    }
  }

  // Model m's logit for (b, v), or -inf beyond its vocabulary.
  double z(int m, size_t b, size_t v) const {
    switch (m) {
      case 0: return m0[b * STRIDE0 + v];
      case 1: return v < V1 ? (double)from_bf16(m1[b * STRIDE1 + v]) : NEG_INF;
      default: return m2[b * STRIDE2 + v];
    }
  }

  medley_model model(int m) const {
    medley_model x;
    std::memset(&x, 0, sizeof x);
    x.temperature = temps[m];
    switch (m) {
      case 0:
        x.logits = medley_rows{m0.data(), m0.size(), MEDLEY_DTYPE_F32, B, V, STRIDE0};
        break;
      case 1:
        x.logits = medley_rows{m1.data(), m1.size(), MEDLEY_DTYPE_BF16, B, V1, STRIDE1};
        break;
      default:
        x.logits = medley_rows{m2.data(), m2.size(), MEDLEY_DTYPE_F32, B, V, STRIDE2};
        break;
    }
    return x;
  }
};

// log-sum-exp of a row (skipping -inf), -inf when empty.
static double lse(const std::vector<double> &x) {
  double mx = NEG_INF;
  for (double v : x) mx = std::max(mx, v);
  if (mx == NEG_INF) return NEG_INF;
  double s = 0;
  for (double v : x) s += std::exp(v - mx);
  return mx + std::log(s);
}

// The reference combination of row b: log-probabilities and ln Z.
static std::vector<double> reference_row(const EnsembleData &d, size_t b, medley_mode mode, const float *w,
                                         double *log_z) {
  std::vector<double> out(V);
  if (mode == MEDLEY_MODE_LINEAR) {
    double wsum = 0;
    std::vector<double> p(V, 0.0);
    for (int m = 0; m < 3; ++m) {
      if (w[m] == 0) continue;
      wsum += w[m];
      std::vector<double> s(V);
      for (size_t v = 0; v < V; ++v) s[v] = d.z(m, b, v) / d.temps[m];
      double l = lse(s);
      for (size_t v = 0; v < V; ++v) p[v] += w[m] * std::exp(s[v] - l);
    }
    for (size_t v = 0; v < V; ++v) out[v] = std::log(p[v] / wsum);
    *log_z = std::log(wsum);
  } else {
    std::vector<double> s(V, 0.0);
    for (size_t v = 0; v < V; ++v) {
      for (int m = 0; m < 3; ++m) {
        if (w[m] == 0) continue;
        double z = d.z(m, b, v);
        s[v] = (z == NEG_INF || s[v] == NEG_INF) ? NEG_INF : s[v] + w[m] * z / d.temps[m];
      }
    }
    double l = lse(s);
    for (size_t v = 0; v < V; ++v) out[v] = s[v] - l;
    *log_z = l;
  }
  return out;
}

struct CpuResult {
  std::vector<float> log_probs, probs, log_z;
  std::vector<uint32_t> argmax;
};

static medley_ensemble_config make_config(medley_mode mode, const float *w, size_t n) {
  medley_ensemble_config cfg = medley_init(medley_ensemble_config_init);
  cfg.mode = mode;
  cfg.weights = w;
  cfg.weights_len = n;
  return cfg;
}

static CpuResult cpu_ensemble(const EnsembleData &d, medley_mode mode, const float *w) {
  medley_model models[3] = {d.model(0), d.model(1), d.model(2)};
  medley_ensemble_config cfg = make_config(mode, w, 3);
  CpuResult r;
  r.log_probs.assign(B * OUT_STRIDE, 7.0f);
  r.probs.assign(B * V, 7.0f);
  r.log_z.assign(B, 7.0f);
  r.argmax.assign(B, 7u);
  medley_ensemble_output out = medley_init(medley_ensemble_output_init);
  out.log_probs = r.log_probs.data();
  out.log_probs_len = r.log_probs.size();
  out.log_probs_stride = OUT_STRIDE;
  out.probs = r.probs.data();
  out.probs_len = r.probs.size();
  out.argmax = r.argmax.data();
  out.argmax_len = B;
  out.log_normalizer = r.log_z.data();
  out.log_normalizer_len = B;
  medley_report rep = medley_init(medley_report_init);
  rep.masked_rows = rep.nan_rows = 99;
  CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &out, &rep), MEDLEY_STATUS_OK);
  CHECK(rep.masked_rows == 0 && rep.nan_rows == 0, "report %zu masked, %zu NaN", rep.masked_rows, rep.nan_rows);
  return r;
}

// ---------------------------------------------------------------------------
// Per-row uncertainty (layout 2 of medley_ensemble_output) and the ABI
// policy (struct_size of older, newer and unknown layouts).

// Entropy of a distribution given by log-probabilities (nats).
static double entropy_of(const std::vector<double> &lp) {
  double h = 0;
  for (double l : lp)
    if (l != NEG_INF) h -= std::exp(l) * l;
  return h;
}

struct Uncertainty {
  double entropy, top1, margin, disagreement;
};

// The reference uncertainty of row b: from the combined log-probabilities,
// and (linear) the mutual information H(mix) - sum_m w_m H(P_m) with the
// normalized weights.
static Uncertainty reference_uncertainty(const EnsembleData &d, size_t b, medley_mode mode, const float *w) {
  double lz;
  std::vector<double> lp = reference_row(d, b, mode, w, &lz);
  Uncertainty u;
  u.entropy = entropy_of(lp);
  std::vector<double> p(V);
  for (size_t v = 0; v < V; ++v) p[v] = std::exp(lp[v]);
  std::vector<double> sorted = p;
  std::sort(sorted.begin(), sorted.end(), [](double a, double c) { return a > c; });
  u.top1 = sorted[0];
  u.margin = sorted[0] - sorted[1];
  u.disagreement = 0;
  if (mode == MEDLEY_MODE_LINEAR) {
    double wsum = 0, mean_h = 0;
    for (int m = 0; m < 3; ++m) wsum += w[m];
    for (int m = 0; m < 3; ++m) {
      if (w[m] == 0) continue;
      std::vector<double> s(V);
      for (size_t v = 0; v < V; ++v) s[v] = d.z(m, b, v) / d.temps[m];
      double l = lse(s);
      for (size_t v = 0; v < V; ++v) s[v] -= l;
      mean_h += w[m] / wsum * entropy_of(s);
    }
    u.disagreement = u.entropy - mean_h;
  }
  return u;
}

static void test_uncertainty_and_abi_cpu(const EnsembleData &d) {
  CHECK(medley_abi_version() == MEDLEY_ABI_VERSION, "medley_abi_version() = %#x, header %#x",
        (unsigned)medley_abi_version(), (unsigned)MEDLEY_ABI_VERSION);
  CHECK(sizeof(medley_ensemble_output) == MEDLEY_ENSEMBLE_OUTPUT_SIZE_V2, "output layout 2 size");
  medley_model models[3] = {d.model(0), d.model(1), d.model(2)};
  const float lin_w[3] = {0.5f, 0.3f, 0.2f};
  const float log_w[3] = {1.0f, -0.5f, 0.5f};
  for (int mode = 0; mode < 2; ++mode) {
    medley_mode md = mode == 0 ? MEDLEY_MODE_LINEAR : MEDLEY_MODE_LOG_LINEAR;
    const float *w = mode == 0 ? lin_w : log_w;
    medley_ensemble_config cfg = make_config(md, w, 3);
    std::vector<float> lp(B * V, 5.0f), h(B, 5.0f), t1(B, 5.0f), mg(B, 5.0f), dis(B, 5.0f);
    medley_ensemble_output out = medley_init(medley_ensemble_output_init);
    out.log_probs = lp.data();
    out.log_probs_len = lp.size();
    out.entropy = h.data();
    out.entropy_len = B;
    out.top1_prob = t1.data();
    out.top1_prob_len = B;
    out.margin = mg.data();
    out.margin_len = B;
    if (mode == 0) {
      out.disagreement = dis.data();
      out.disagreement_len = B;
    }
    CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &out, nullptr), MEDLEY_STATUS_OK);
    for (size_t b = 0; b < B; ++b) {
      Uncertainty u = reference_uncertainty(d, b, md, w);
      CHECK(close_to(h[b], u.entropy, 1e-5, 1e-5), "mode %d row %zu entropy %.7g, want %.7g", mode, b, h[b],
            u.entropy);
      CHECK(close_to(t1[b], u.top1, 1e-6, 1e-5), "mode %d row %zu top-1 %.7g, want %.7g", mode, b, t1[b], u.top1);
      CHECK(close_to(mg[b], u.margin, 1e-6, 1e-5), "mode %d row %zu margin %.7g, want %.7g", mode, b, mg[b],
            u.margin);
      if (mode == 0)
        CHECK(close_to(dis[b], u.disagreement, 1e-5, 1e-4), "row %zu disagreement %.7g, want %.7g", b, dis[b],
              u.disagreement);
    }
    if (mode == 1) {
      // Disagreement is for linear mixtures: refused, nothing written.
      std::fill(h.begin(), h.end(), 5.0f);
      out.disagreement = dis.data();
      out.disagreement_len = B;
      CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &out, nullptr), MEDLEY_STATUS_UNSUPPORTED);
      for (size_t b = 0; b < B; ++b) CHECK(h[b] == 5.0f && dis[b] == 5.0f, "failed call wrote row %zu", b);
    }
  }

  // A caller compiled against layout 1 of medley_ensemble_output (ABI
  // 1.0): its struct ends at log_normalizer_len.
  struct output_v1 {
    size_t struct_size;
    float *log_probs;
    size_t log_probs_len, log_probs_stride;
    float *probs;
    size_t probs_len, probs_stride;
    uint32_t *argmax;
    size_t argmax_len;
    float *log_normalizer;
    size_t log_normalizer_len;
  };
  static_assert(sizeof(output_v1) == MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1, "layout 1");
  medley_ensemble_config cfg = make_config(MEDLEY_MODE_LINEAR, lin_w, 3);
  std::vector<float> lp(B * V, 5.0f);
  std::vector<uint32_t> am(B, 5u);
  output_v1 old;
  std::memset(&old, 0, sizeof old);
  old.struct_size = sizeof old;
  old.log_probs = lp.data();
  old.log_probs_len = lp.size();
  old.argmax = am.data();
  old.argmax_len = B;
  CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, reinterpret_cast<medley_ensemble_output *>(&old),
                                       nullptr),
               MEDLEY_STATUS_OK);
  CpuResult ref = cpu_ensemble(d, MEDLEY_MODE_LINEAR, lin_w);
  for (size_t b = 0; b < B; ++b) CHECK(am[b] == ref.argmax[b], "layout-1 argmax row %zu", b);

  // A caller compiled against a newer header: 16 more bytes. Zero: the
  // library accepts it; a field set there: MEDLEY_STATUS_STRUCT_SIZE.
  struct output_next {
    medley_ensemble_output now;
    uint64_t future[2];
  } next;
  std::memset(&next, 0, sizeof next);
  next.now = medley_init(medley_ensemble_output_init);
  next.now.struct_size = sizeof next;
  next.now.log_probs = lp.data();
  next.now.log_probs_len = lp.size();
  CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &next.now, nullptr), MEDLEY_STATUS_OK);
  next.future[1] = 1;
  std::fill(lp.begin(), lp.end(), 5.0f);
  CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &next.now, nullptr), MEDLEY_STATUS_STRUCT_SIZE);
  for (float x : lp) CHECK(x == 5.0f, "refused newer layout wrote an output");
  // Sizes that are no layout.
  medley_ensemble_output bad = medley_init(medley_ensemble_output_init);
  bad.log_probs = lp.data();
  bad.log_probs_len = lp.size();
  const size_t sizes[4] = {0, 40, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1 + 8, 100000};
  for (size_t sz : sizes) {
    bad.struct_size = sz;
    CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &bad, nullptr), MEDLEY_STATUS_STRUCT_SIZE);
  }
  for (float x : lp) CHECK(x == 5.0f, "a refused struct_size wrote an output");
  CHECK(std::strcmp(medley_status_name(MEDLEY_STATUS_STRUCT_SIZE), "MEDLEY_STATUS_STRUCT_SIZE") == 0, "name");
  CHECK(last_message().find("struct_size") != std::string::npos, "message: %s", last_message().c_str());
  // init at an older size writes only that many bytes.
  alignas(8) unsigned char raw[sizeof(medley_ensemble_output) + 8];
  std::memset(raw, 0xAB, sizeof raw);
  CHECK_STATUS(medley_ensemble_output_init(reinterpret_cast<medley_ensemble_output *>(raw),
                                           MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1),
               MEDLEY_STATUS_OK);
  bool tail = true;
  for (size_t i = MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1; i < sizeof raw; ++i) tail = tail && raw[i] == 0xAB;
  CHECK(tail, "init wrote past struct_size");
  std::printf("cpu: uncertainty outputs match the C++ reference; ABI 1.1 struct_size policy (old, newer, bad "
              "layouts) holds\n");
}

static void test_ensemble_cpu(const EnsembleData &d) {
  const float lin_w[3] = {0.5f, 0.3f, 0.2f};
  const float log_w[3] = {1.0f, -0.5f, 0.5f};
  for (int mi = 0; mi < 2; ++mi) {
    medley_mode mode = mi == 0 ? MEDLEY_MODE_LINEAR : MEDLEY_MODE_LOG_LINEAR;
    const float *w = mi == 0 ? lin_w : log_w;
    CpuResult r = cpu_ensemble(d, mode, w);
    for (size_t b = 0; b < B; ++b) {
      double log_z = 0;
      std::vector<double> want = reference_row(d, b, mode, w, &log_z);
      size_t best = 0;
      for (size_t v = 0; v < V; ++v) {
        double got = r.log_probs[b * OUT_STRIDE + v];
        CHECK(close_to(got, want[v], 2e-5, 2e-5), "mode %d row %zu token %zu: log-prob %.9g, want %.9g", mi, b, v,
              got, want[v]);
        double p = r.probs[b * V + v];
        CHECK(std::fabs(p - std::exp(want[v])) <= 2e-6, "mode %d row %zu token %zu: prob %.9g, want %.9g", mi, b,
              v, p, std::exp(want[v]));
        if (want[v] > want[best]) best = v;
      }
      for (size_t v = V; v < OUT_STRIDE; ++v)
        CHECK(r.log_probs[b * OUT_STRIDE + v] == 7.0f, "output padding written at row %zu column %zu", b, v);
      CHECK(r.argmax[b] == best, "mode %d row %zu: argmax %u, want %zu", mi, b, r.argmax[b], best);
      CHECK(close_to(r.log_z[b], log_z, 2e-5, 2e-5), "mode %d row %zu: ln Z %.9g, want %.9g", mi, b, r.log_z[b],
            log_z);
    }
    // Tokens masked by model 2 are -inf in log-linear mode only.
    bool masked = std::isinf(r.log_probs[3]) && r.log_probs[3] < 0;
    CHECK(masked == (mode == MEDLEY_MODE_LOG_LINEAR), "mode %d: token 3 masked = %d", mi, (int)masked);
  }
  std::printf("cpu: ensemble combination (linear and log-linear, f32 + bf16, strided, padded vocabulary) matches "
              "the C++ reference\n");
}

// ---------------------------------------------------------------------------
// Top-k gating.

static void test_gating_cpu() {
  const size_t T = 4, E = 10, K = 3;
  std::vector<float> logits(T * E);
  for (size_t i = 0; i < T * E; ++i) logits[i] = (float)((i * 7919) % 23) * 0.25f - 2.5f;
  logits[2 * E + 4] = logits[2 * E + 8] = 9.0f;  // a tie: expert 4 must come before expert 8
  medley_rows x{logits.data(), logits.size(), MEDLEY_DTYPE_F32, T, E, 0};
  for (int renorm = 0; renorm < 2; ++renorm) {
    std::vector<uint32_t> ids(T * K, 77);
    std::vector<float> w(T * K, 77.0f);
    medley_report rep = medley_init(medley_report_init);
    rep.masked_rows = rep.nan_rows = 99;
    CHECK_STATUS(medley_moe_topk_softmax(&x, K, renorm, ids.data(), ids.size(), w.data(), w.size(), &rep),
                 MEDLEY_STATUS_OK);
    CHECK(rep.masked_rows == 0 && rep.nan_rows == 0, "gating report");
    for (size_t t = 0; t < T; ++t) {
      const float *row = &logits[t * E];
      std::vector<size_t> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [row](size_t a, size_t b) { return row[a] > row[b]; });
      double mx = row[order[0]], s = 0;
      for (size_t e = 0; e < E; ++e) s += std::exp(row[e] - mx);
      double picked = 0;
      for (size_t j = 0; j < K; ++j) picked += std::exp(row[order[j]] - mx) / s;
      for (size_t j = 0; j < K; ++j) {
        double want = std::exp(row[order[j]] - mx) / s;
        if (renorm) want /= picked;
        CHECK(ids[t * K + j] == order[j], "renorm %d token %zu pick %zu: expert %u, want %zu", renorm, t, j,
              ids[t * K + j], order[j]);
        CHECK(close_to(w[t * K + j], want, 1e-7, 2e-6), "renorm %d token %zu pick %zu: weight %.9g, want %.9g",
              renorm, t, j, w[t * K + j], want);
      }
    }
    CHECK(ids[2 * K] == 4 && ids[2 * K + 1] == 8, "tie order: %u %u", ids[2 * K], ids[2 * K + 1]);
  }
  // Softmax over the kept logits only.
  std::vector<uint32_t> ids(T * K);
  std::vector<float> w(T * K);
  CHECK_STATUS(medley_moe_keep_topk_softmax(&x, K, ids.data(), ids.size(), w.data(), w.size(), nullptr),
               MEDLEY_STATUS_OK);
  for (size_t t = 0; t < T; ++t) {
    double s = 0;
    for (size_t j = 0; j < K; ++j) s += std::exp((double)logits[t * E + ids[t * K + j]] - logits[t * E + ids[t * K]]);
    for (size_t j = 0; j < K; ++j) {
      double want = std::exp((double)logits[t * E + ids[t * K + j]] - logits[t * E + ids[t * K]]) / s;
      CHECK(close_to(w[t * K + j], want, 1e-7, 2e-6), "keep-top-k token %zu pick %zu: %.9g vs %.9g", t, j,
            w[t * K + j], want);
    }
  }
  std::printf("cpu: top-k gating (softmax then top-k, renormalized or not; softmax over the kept logits) matches "
              "the C++ reference, ties to the lower expert\n");
}

// ---------------------------------------------------------------------------
// The error contract.

static void test_errors_cpu(const EnsembleData &d) {
  CHECK(std::strcmp(medley_status_name(MEDLEY_STATUS_OK), "MEDLEY_STATUS_OK") == 0, "name of OK");
  CHECK(std::strcmp(medley_status_name(MEDLEY_STATUS_BAD_SHAPE), "MEDLEY_STATUS_BAD_SHAPE") == 0, "name");
  CHECK(std::strcmp(medley_status_name(12345), "MEDLEY_STATUS_UNKNOWN") == 0, "unknown name");
  CHECK(std::strcmp(medley_version(), "") != 0, "version");

  const float w[3] = {0.5f, 0.3f, 0.2f};
  medley_model models[3] = {d.model(0), d.model(1), d.model(2)};
  std::vector<float> lp(B * V, 42.0f);
  std::vector<uint32_t> am(B, 42u);
  medley_ensemble_output out = medley_init(medley_ensemble_output_init);
  out.log_probs = lp.data();
  out.log_probs_len = lp.size();
  out.argmax = am.data();
  out.argmax_len = am.size();
  medley_report rep = medley_init(medley_report_init);
  rep.masked_rows = rep.nan_rows = 42;
  auto untouched = [&]() {
    for (float x : lp)
      if (x != 42.0f) return false;
    for (uint32_t x : am)
      if (x != 42u) return false;
    return rep.masked_rows == 42 && rep.nan_rows == 42;
  };

  medley_ensemble_config cfg = make_config(MEDLEY_MODE_LINEAR, nullptr, 3);  // null weights, length 3
  CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &out, &rep), MEDLEY_STATUS_NULL_ARGUMENT);
  CHECK(last_message().find("config.weights") != std::string::npos, "message: %s", last_message().c_str());
  CHECK(untouched(), "outputs written by a call with a null argument");

  cfg = make_config(MEDLEY_MODE_LINEAR, w, 3);
  medley_model short_models[3] = {models[0], models[1], models[2]};
  short_models[0].logits.data_len = (B - 1) * STRIDE0 + V - 1;  // one element short
  CHECK_STATUS(medley_ensemble_combine(short_models, 3, &cfg, B, V, &out, &rep), MEDLEY_STATUS_BAD_SHAPE);
  CHECK(untouched(), "outputs written by a call with a bad shape");

  short_models[0].logits.data_len = SIZE_MAX / 2;  // bytes overflow
  CHECK_STATUS(medley_ensemble_combine(short_models, 3, &cfg, B, V, &out, &rep), MEDLEY_STATUS_OVERFLOW);

  const float neg[3] = {0.5f, -0.3f, 0.2f};
  cfg = make_config(MEDLEY_MODE_LINEAR, neg, 3);
  CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &out, &rep), MEDLEY_STATUS_BAD_PARAMETER);
  cfg = make_config(MEDLEY_MODE_LINEAR, w, 3);
  cfg.mode = 5;  // not a medley_mode
  CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &out, &rep), MEDLEY_STATUS_BAD_PARAMETER);
  cfg = make_config(MEDLEY_MODE_LINEAR, w, 3);
  out.argmax = reinterpret_cast<uint32_t *>(lp.data() + 1);  // inside log_probs
  CHECK_STATUS(medley_ensemble_combine(models, 3, &cfg, B, V, &out, &rep), MEDLEY_STATUS_OVERLAP);
  out.argmax = am.data();
  CHECK(untouched(), "outputs written by a failed call");
  CHECK(medley_last_cuda_error() == 0, "a CPU failure has no CUDA code");

  // Gating: k = 0, outputs untouched.
  std::vector<float> logits(8, 0.5f);
  medley_rows x{logits.data(), logits.size(), MEDLEY_DTYPE_F32, 2, 4, 0};
  std::vector<uint32_t> ids(4, 42u);
  std::vector<float> gw(4, 42.0f);
  CHECK_STATUS(medley_moe_topk_softmax(&x, 0, 1, ids.data(), 0, gw.data(), 0, nullptr), MEDLEY_STATUS_BAD_PARAMETER);
  CHECK_STATUS(medley_moe_topk_softmax(&x, 2, 1, nullptr, 4, gw.data(), 4, nullptr), MEDLEY_STATUS_NULL_ARGUMENT);
  x.dtype = 9;
  CHECK_STATUS(medley_moe_topk_softmax(&x, 2, 1, ids.data(), 4, gw.data(), 4, nullptr), MEDLEY_STATUS_BAD_PARAMETER);
  for (size_t i = 0; i < 4; ++i) CHECK(ids[i] == 42u && gw[i] == 42.0f, "gating outputs written on failure");
  std::printf("cpu: error contract (null, shape, overflow, parameter, enum, overlap; names and messages; outputs "
              "untouched)\n");
}

#if defined(MEDLEY_CUDA)
// ---------------------------------------------------------------------------
// GPU part.

struct DeviceBuffers {
  std::vector<CUdeviceptr> ptrs;
  ~DeviceBuffers() {
    for (CUdeviceptr p : ptrs) cuMemFree_v2(p);
  }
  CUdeviceptr alloc(size_t bytes) {
    CUdeviceptr p = 0;
    if (cuMemAlloc_v2(&p, bytes < 16 ? 16 : bytes) != 0) return 0;
    ptrs.push_back(p);
    return p;
  }
};

static void compare_gpu(const char *what, const CpuResult &cpu, const std::vector<float> &lp,
                        const std::vector<uint32_t> &am, const std::vector<float> &lz) {
  int bad = 0;
  for (size_t b = 0; b < B; ++b) {
    for (size_t v = 0; v < V; ++v) {
      double want = cpu.log_probs[b * OUT_STRIDE + v], got = lp[b * OUT_STRIDE + v];
      if (!close_to(got, want, 3e-4, 3e-5) && bad++ < 5)
        std::fprintf(stderr, "  %s row %zu token %zu: GPU %.9g, CPU %.9g\n", what, b, v, got, want);
    }
    // The argmax is a maximal token (GPU and CPU may split a near-tie).
    float best = cpu.log_probs[b * OUT_STRIDE + cpu.argmax[b]];
    CHECK(am[b] < V && cpu.log_probs[b * OUT_STRIDE + am[b]] >= best - 1e-4f, "%s row %zu: GPU argmax %u, CPU %u",
          what, b, am[b], cpu.argmax[b]);
    CHECK(close_to(lz[b], cpu.log_z[b], 3e-4, 3e-5), "%s row %zu: GPU ln Z %.9g, CPU %.9g", what, b, lz[b],
          cpu.log_z[b]);
  }
  CHECK(bad == 0, "%s: %d log-probabilities differ from the CPU", what, bad);
}

static void gpu_part(const EnsembleData &d) {
  CUresult init = cuInit(0);
  if (init != 0) {
    const char *require = std::getenv("MEDLEY_REQUIRE_GPU");
    CHECK(!(require && std::strcmp(require, "1") == 0), "MEDLEY_REQUIRE_GPU=1 but cuInit returned %d", init);
    std::printf("gpu: skipped: cuInit returned %d (34 = the stub driver of a CPU-only build, 100 = no device)\n",
                init);
    CHECK_STATUS(medley_cuda_probe(), MEDLEY_STATUS_DRIVER);
    CHECK(medley_last_cuda_error() == init, "medley_last_cuda_error() = %d, cuInit = %d", medley_last_cuda_error(),
          init);
    medley_cuda_engine *engine = reinterpret_cast<medley_cuda_engine *>(0x1);
    CHECK_STATUS(medley_cuda_engine_new(nullptr, &engine), MEDLEY_STATUS_DRIVER);
    CHECK(engine == reinterpret_cast<medley_cuda_engine *>(0x1), "engine written by a failed call");
    medley_cuda_engine_options eo = medley_init(medley_cuda_engine_options_init);
    eo.modules = MEDLEY_CUDA_MODULES_ENSEMBLE;
    CHECK_STATUS(medley_cuda_engine_new_with(nullptr, &eo, &engine), MEDLEY_STATUS_DRIVER);
    eo.modules = 0;
    CHECK_STATUS(medley_cuda_engine_new_with(nullptr, &eo, &engine), MEDLEY_STATUS_BAD_PARAMETER);
    CHECK(engine == reinterpret_cast<medley_cuda_engine *>(0x1), "engine written by a failed call");
    return;
  }
  CUdevice dev;
  CUcontext ctx;
  CU(cuDeviceGet(&dev, 0));
  CU(cuDevicePrimaryCtxRetain(&ctx, dev));
  CU(cuCtxPushCurrent_v2(ctx));
  CUstream stream;
  CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
  CHECK_STATUS(medley_cuda_probe(), MEDLEY_STATUS_OK);
  {
    medley_cuda_engine *engine = nullptr;
    medley_status s = medley_cuda_engine_new(stream, &engine);
    if (s != MEDLEY_STATUS_OK) {
      CHECK(false, "medley_cuda_engine_new: %s (CUDA %d): %s", medley_status_name(s), medley_last_cuda_error(),
            last_message().c_str());
      cuStreamDestroy_v2(stream);
      return;
    }
    DeviceBuffers mem;
    // All models of one GPU call share a dtype: f32 here (model 1's bf16
    // values widened exactly).
    CUdeviceptr d0 = mem.alloc(d.m0.size() * 4), d1 = mem.alloc(d.m1_f32.size() * 4), d2 = mem.alloc(d.m2.size() * 4);
    CUdeviceptr dlp = mem.alloc(B * OUT_STRIDE * 4), dam = mem.alloc(B * 4), dlz = mem.alloc(B * 4);
    CUdeviceptr dw = mem.alloc(B * 4 * 4);
    CHECK(d0 && d1 && d2 && dlp && dam && dlz && dw, "cuMemAlloc failed");
    if (!(d0 && d1 && d2 && dlp && dam && dlz && dw)) return;
    CU(cuMemcpyHtoDAsync_v2(d0, d.m0.data(), d.m0.size() * 4, stream));
    CU(cuMemcpyHtoDAsync_v2(d1, d.m1_f32.data(), d.m1_f32.size() * 4, stream));
    CU(cuMemcpyHtoDAsync_v2(d2, d.m2.data(), d.m2.size() * 4, stream));
    medley_cuda_model models[3] = {
        {{d0, d.m0.size(), MEDLEY_DTYPE_F32, B, V, STRIDE0}, d.temps[0]},
        {{d1, d.m1_f32.size(), MEDLEY_DTYPE_F32, B, V1, STRIDE1}, d.temps[1]},
        {{d2, d.m2.size(), MEDLEY_DTYPE_F32, B, V, STRIDE2}, d.temps[2]},
    };
    medley_cuda_ensemble_output out = medley_init(medley_cuda_ensemble_output_init);
    out.log_probs = dlp;
    out.log_probs_len = B * OUT_STRIDE;
    out.log_probs_stride = OUT_STRIDE;
    out.argmax = dam;
    out.argmax_len = B;
    out.log_normalizer = dlz;
    out.log_normalizer_len = B;
    size_t ws_bytes = 0;
    CHECK_STATUS(medley_cuda_ensemble_workspace_bytes(engine, B, V, 3, MEDLEY_DTYPE_F32, &ws_bytes),
                 MEDLEY_STATUS_OK);
    CUdeviceptr ws = ws_bytes ? mem.alloc(ws_bytes) : 0;
    if (ws) CU(cuMemsetD8Async(ws, 0, ws_bytes, stream));
    std::printf("gpu: engine loaded; workspace for the split-row kernel: %zu bytes\n", ws_bytes);

    std::vector<float> lp(B * OUT_STRIDE), lz(B);
    std::vector<uint32_t> am(B);
    auto read_back = [&]() {
      CUresult r = cuMemcpyDtoHAsync_v2(lp.data(), dlp, lp.size() * 4, stream);
      if (r == 0) r = cuMemcpyDtoHAsync_v2(am.data(), dam, am.size() * 4, stream);
      if (r == 0) r = cuMemcpyDtoHAsync_v2(lz.data(), dlz, lz.size() * 4, stream);
      if (r == 0) r = cuStreamSynchronize(stream);
      CHECK(r == 0, "read back: CUDA %d", r);
    };
    const float lin_w[3] = {0.5f, 0.3f, 0.2f};
    const float log_w[3] = {1.0f, -0.5f, 0.5f};
    const uint32_t kernels[3] = {MEDLEY_CUDA_KERNEL_V1, MEDLEY_CUDA_KERNEL_AUTO, MEDLEY_CUDA_KERNEL_V2};
    const char *kernel_names[3] = {"v1", "auto", "v2"};
    for (int mi = 0; mi < 2; ++mi) {
      medley_mode mode = mi == 0 ? MEDLEY_MODE_LINEAR : MEDLEY_MODE_LOG_LINEAR;
      const float *w = mi == 0 ? lin_w : log_w;
      CpuResult cpu = cpu_ensemble(d, mode, w);
      medley_ensemble_config cfg = make_config(mode, w, 3);
      for (int ki = 0; ki < 3; ++ki) {
        if (kernels[ki] == MEDLEY_CUDA_KERNEL_V2 && ws_bytes == 0) continue;
        CU(cuMemsetD8Async(dlp, 0xff, B * OUT_STRIDE * 4, stream));  // NaN poison
        medley_status s = medley_cuda_ensemble_combine(engine, stream, models, 3, &cfg, B, V, &out, ws, ws_bytes,
                                                       kernels[ki]);
        CHECK(s == MEDLEY_STATUS_OK, "GPU combine (%s, mode %d): %s: %s", kernel_names[ki], mi,
              medley_status_name(s), last_message().c_str());
        read_back();
        std::string what = std::string(mi == 0 ? "linear/" : "log-linear/") + kernel_names[ki];
        compare_gpu(what.c_str(), cpu, lp, am, lz);
      }
    }
    std::printf("gpu: ensemble on our own stream (kernels v1, auto%s) matches the CPU in both modes\n",
                ws_bytes ? ", v2" : "");

    // An engine with the ensemble module only: the ensemble runs, gating
    // says which module it needs, nothing is enqueued.
    {
      medley_cuda_engine_options eo = medley_init(medley_cuda_engine_options_init);
      eo.modules = MEDLEY_CUDA_MODULES_ENSEMBLE;
      medley_cuda_engine *small = nullptr;
      CHECK_STATUS(medley_cuda_engine_new_with(stream, &eo, &small), MEDLEY_STATUS_OK);
      if (small) {
        CpuResult cpu = cpu_ensemble(d, MEDLEY_MODE_LINEAR, lin_w);
        medley_ensemble_config cfg = make_config(MEDLEY_MODE_LINEAR, lin_w, 3);
        CU(cuMemsetD8Async(dlp, 0xff, B * OUT_STRIDE * 4, stream));
        CHECK_STATUS(medley_cuda_ensemble_combine(small, stream, models, 3, &cfg, B, V, &out, 0, 0,
                                                  MEDLEY_CUDA_KERNEL_V1),
                     MEDLEY_STATUS_OK);
        read_back();
        compare_gpu("linear/v1 (ensemble-only engine)", cpu, lp, am, lz);
        medley_cuda_rows gr{dlp, B * OUT_STRIDE, MEDLEY_DTYPE_F32, B, 8, OUT_STRIDE};
        CHECK_STATUS(medley_cuda_moe_topk_softmax(small, stream, &gr, 2, 1, dam, 2 * B, dlz, 2 * B),
                     MEDLEY_STATUS_DEVICE_UNSUPPORTED);
        CHECK_STATUS(medley_cuda_engine_destroy(small), MEDLEY_STATUS_OK);
        char log[64];
        size_t n = 1;
        CHECK_STATUS(medley_cuda_last_jit_log(log, sizeof log, &n), MEDLEY_STATUS_OK);
        CHECK(n == 0, "JIT log after a successful load: %zu bytes", n);
        std::printf("gpu: an ensemble-only engine (medley_cuda_engine_new_with) runs the ensemble and refuses "
                    "gating\n");
      }
    }

    // The per-row uncertainty outputs (layout 2) on the GPU against the
    // C++ reference, every kernel, outputs poisoned with NaN first.
    {
      CUdeviceptr dunc = mem.alloc(4 * B * 4);
      CHECK(dunc != 0, "cuMemAlloc failed");
      if (!dunc) return;
      medley_cuda_ensemble_output uo = out;
      uo.entropy = dunc;
      uo.entropy_len = B;
      uo.top1_prob = dunc + B * 4;
      uo.top1_prob_len = B;
      uo.margin = dunc + 2 * B * 4;
      uo.margin_len = B;
      int runs = 0;
      for (int mi = 0; mi < 2; ++mi) {
        medley_mode mode = mi == 0 ? MEDLEY_MODE_LINEAR : MEDLEY_MODE_LOG_LINEAR;
        const float *w = mi == 0 ? lin_w : log_w;
        medley_ensemble_config cfg = make_config(mode, w, 3);
        uo.disagreement = mi == 0 ? dunc + 3 * B * 4 : 0;
        uo.disagreement_len = mi == 0 ? B : 0;
        for (int ki = 0; ki < 3; ++ki) {
          if (kernels[ki] == MEDLEY_CUDA_KERNEL_V2 && ws_bytes == 0) continue;
          CU(cuMemsetD8Async(dunc, 0xff, 4 * B * 4, stream));
          medley_status s = medley_cuda_ensemble_combine(engine, stream, models, 3, &cfg, B, V, &uo, ws, ws_bytes,
                                                         kernels[ki]);
          CHECK(s == MEDLEY_STATUS_OK, "GPU combine with uncertainty (%s, mode %d): %s: %s", kernel_names[ki], mi,
                medley_status_name(s), last_message().c_str());
          std::vector<float> u(4 * B);
          CU(cuMemcpyDtoHAsync_v2(u.data(), dunc, u.size() * 4, stream));
          CU(cuStreamSynchronize(stream));
          ++runs;
          for (size_t b = 0; b < B; ++b) {
            Uncertainty r = reference_uncertainty(d, b, mode, w);
            const double want[4] = {r.entropy, r.top1, r.margin, r.disagreement};
            const char *names[4] = {"entropy", "top1_prob", "margin", "disagreement"};
            for (int q = 0; q < (mi == 0 ? 4 : 3); ++q)
              CHECK(close_to(u[q * B + b], want[q], 1e-4, 1e-4), "GPU %s (%s, mode %d) row %zu: %.7g, want %.7g",
                    names[q], kernel_names[ki], mi, b, u[q * B + b], want[q]);
          }
        }
      }
      // Disagreement in log-linear mode: refused before the launch.
      medley_ensemble_config cfg = make_config(MEDLEY_MODE_LOG_LINEAR, log_w, 3);
      uo.disagreement = dunc + 3 * B * 4;
      uo.disagreement_len = B;
      CHECK_STATUS(medley_cuda_ensemble_combine(engine, stream, models, 3, &cfg, B, V, &uo, ws, ws_bytes,
                                                MEDLEY_CUDA_KERNEL_AUTO),
                   MEDLEY_STATUS_UNSUPPORTED);
      std::printf("gpu: uncertainty outputs (entropy, top-1, margin, disagreement) match the C++ reference in %d "
                  "GPU runs\n",
                  runs);
    }

    // Per-row weights from device memory against the CPU's host table.
    const float table[B * 4] = {1, 0, 0, 0, 0.2f, 0.5f, 0.3f, 0, 0, 0, 1, 0};
    CU(cuMemcpyHtoDAsync_v2(dw, table, sizeof table, stream));
    {
      medley_ensemble_config cfg = make_config(MEDLEY_MODE_LINEAR, table, B * 4);
      cfg.weights_stride = 4;
      medley_model cm[3] = {d.model(0), d.model(1), d.model(2)};
      CpuResult cpu;
      cpu.log_probs.assign(B * OUT_STRIDE, 0.0f);
      cpu.log_z.assign(B, 0.0f);
      cpu.argmax.assign(B, 0u);
      medley_ensemble_output cout_ = medley_init(medley_ensemble_output_init);
      cout_.log_probs = cpu.log_probs.data();
      cout_.log_probs_len = cpu.log_probs.size();
      cout_.log_probs_stride = OUT_STRIDE;
      cout_.argmax = cpu.argmax.data();
      cout_.argmax_len = B;
      cout_.log_normalizer = cpu.log_z.data();
      cout_.log_normalizer_len = B;
      CHECK_STATUS(medley_ensemble_combine(cm, 3, &cfg, B, V, &cout_, nullptr), MEDLEY_STATUS_OK);
      cfg.weights = nullptr;
      cfg.weights_len = B * 4;
      cfg.device_weights = dw;
      CHECK_STATUS(medley_cuda_ensemble_combine(engine, stream, models, 3, &cfg, B, V, &out, 0, 0,
                                                MEDLEY_CUDA_KERNEL_AUTO),
                   MEDLEY_STATUS_OK);
      read_back();
      compare_gpu("per-row device weights", cpu, lp, am, lz);
    }

    // A bad call enqueues nothing: poison, fail, read back the poison.
    CU(cuMemsetD8Async(dlp, 0x7f, B * OUT_STRIDE * 4, stream));
    {
      medley_ensemble_config cfg = make_config(MEDLEY_MODE_LINEAR, lin_w, 3);
      cfg.out_temperature = 0.0f;
      CHECK_STATUS(medley_cuda_ensemble_combine(engine, stream, models, 3, &cfg, B, V, &out, 0, 0, 0),
                   MEDLEY_STATUS_BAD_PARAMETER);
      cfg.out_temperature = 1.0f;
      medley_cuda_ensemble_output mis = out;
      mis.log_probs = dlp + 2;  // misaligned
      CHECK_STATUS(medley_cuda_ensemble_combine(engine, stream, models, 3, &cfg, B, V, &mis, 0, 0, 0),
                   MEDLEY_STATUS_MISALIGNED);
      medley_cuda_model mixed[3] = {models[0], models[1], models[2]};
      mixed[1].logits.dtype = MEDLEY_DTYPE_BF16;
      CHECK_STATUS(medley_cuda_ensemble_combine(engine, stream, mixed, 3, &cfg, B, V, &out, 0, 0, 0),
                   MEDLEY_STATUS_UNSUPPORTED);
      read_back();
      bool poisoned = true;
      for (float x : lp) {
        uint32_t u;
        std::memcpy(&u, &x, 4);
        poisoned = poisoned && u == 0x7f7f7f7fu;
      }
      CHECK(poisoned, "a failed GPU call wrote its outputs");
    }
    // Top-k gating on the GPU against the CPU, bit for bit (bf16 router
    // logits; a tie, a fully masked row and a NaN row included).
    {
      const size_t T = 64, E = 256, K = 8;
      std::vector<uint16_t> lg(T * E);
      uint32_t st = 99;
      for (auto &x : lg) {
        st = st * 1664525u + 1013904223u;
        x = to_bf16(((st >> 8) & 0xffff) / 4096.0f - 8.0f);
      }
      lg[5] = lg[200] = to_bf16(30.0f);                                   // row 0: tie at the top
      for (size_t e = 0; e < E; ++e) lg[1 * E + e] = to_bf16(-INFINITY);  // row 1: fully masked
      lg[2 * E + 17] = 0x7fc0;                                            // row 2: NaN
      CUdeviceptr dl = mem.alloc(lg.size() * 2), dids = mem.alloc(T * K * 4), dwt = mem.alloc(T * K * 4);
      CHECK(dl && dids && dwt, "cuMemAlloc failed");
      if (!(dl && dids && dwt)) return;
      CU(cuMemcpyHtoDAsync_v2(dl, lg.data(), lg.size() * 2, stream));
      medley_rows hx{lg.data(), lg.size(), MEDLEY_DTYPE_BF16, T, E, 0};
      medley_cuda_rows dx{dl, lg.size(), MEDLEY_DTYPE_BF16, T, E, 0};
      for (int variant = 0; variant < 3; ++variant) {
        std::vector<uint32_t> cids(T * K), gids(T * K);
        std::vector<float> cw(T * K), gw(T * K);
        medley_status cs, gs;
        if (variant < 2) {
          cs = medley_moe_topk_softmax(&hx, K, variant, cids.data(), T * K, cw.data(), T * K, nullptr);
          gs = medley_cuda_moe_topk_softmax(engine, stream, &dx, K, variant, dids, T * K, dwt, T * K);
        } else {
          cs = medley_moe_keep_topk_softmax(&hx, K, cids.data(), T * K, cw.data(), T * K, nullptr);
          gs = medley_cuda_moe_keep_topk_softmax(engine, stream, &dx, K, dids, T * K, dwt, T * K);
        }
        CHECK(cs == MEDLEY_STATUS_OK && gs == MEDLEY_STATUS_OK, "gating variant %d: CPU %s, GPU %s: %s", variant,
              medley_status_name(cs), medley_status_name(gs), last_message().c_str());
        CU(cuMemcpyDtoHAsync_v2(gids.data(), dids, T * K * 4, stream));
        CU(cuMemcpyDtoHAsync_v2(gw.data(), dwt, T * K * 4, stream));
        CU(cuStreamSynchronize(stream));
        int diff = 0;
        for (size_t i = 0; i < T * K; ++i) {
          bool same = gids[i] == cids[i] &&
                      ((std::isnan(gw[i]) && std::isnan(cw[i])) || std::memcmp(&gw[i], &cw[i], 4) == 0);
          if (!same && diff++ < 5)
            std::fprintf(stderr, "  gating variant %d slot %zu: GPU (%u, %.9g), CPU (%u, %.9g)\n", variant, i,
                         gids[i], gw[i], cids[i], cw[i]);
        }
        CHECK(diff == 0, "gating variant %d: %d slots differ between GPU and CPU", variant, diff);
        CHECK(cids[0] == 5 && cids[1] == 200, "tie order on the CPU: %u %u", cids[0], cids[1]);
        CHECK(std::isnan(cw[2 * K]) && cw[K] == 0.0f, "NaN and masked rows");
      }
      // A bad call enqueues nothing (k above E): the previous ids stay.
      std::vector<uint32_t> before(T * K), after(T * K);
      CU(cuMemcpyDtoHAsync_v2(before.data(), dids, T * K * 4, stream));
      CHECK_STATUS(medley_cuda_moe_topk_softmax(engine, stream, &dx, E + 1, 1, dids, T * K, dwt, T * K),
                   MEDLEY_STATUS_BAD_SHAPE);
      CU(cuMemcpyDtoHAsync_v2(after.data(), dids, T * K * 4, stream));
      CU(cuStreamSynchronize(stream));
      CHECK(before == after, "a failed GPU gating call wrote its outputs");
      std::printf("gpu: top-k gating (three variants, bf16, tie, masked and NaN rows) equals the CPU bit for "
                  "bit\n");
    }
    CHECK(cuStreamSynchronize(stream) == 0, "stream error");
    CHECK_STATUS(medley_cuda_engine_destroy(engine), MEDLEY_STATUS_OK);
    std::printf("gpu: per-row device weights match; failed calls enqueue nothing; engine destroyed\n");
  }
  CU(cuStreamDestroy_v2(stream));
  CUcontext popped;
  CU(cuCtxPopCurrent_v2(&popped));
  CU(cuDevicePrimaryCtxRelease_v2(dev));
}
#endif  // MEDLEY_CUDA

int main() {
  EnsembleData d;
  test_ensemble_cpu(d);
  test_gating_cpu();
  test_merge_cpu();
  test_moe_cpu();
  test_errors_cpu(d);
  test_uncertainty_and_abi_cpu(d);
#if defined(MEDLEY_CUDA)
  CHECK(medley_has_cuda(), "medley_has_cuda() is false: a CPU-only library, compile with -DMEDLEY_NO_CUDA");
  gpu_part(d);
  test_moe_gpu();
#else
  CHECK(!medley_has_cuda(), "medley_has_cuda() is true with MEDLEY_NO_CUDA defined");
  std::printf("gpu: not built (MEDLEY_NO_CUDA)\n");
#endif
  if (g_failures) {
    std::printf("medley C++ consumer: %d of %d checks FAILED\n", g_failures, g_checks);
    return 1;
  }
  std::printf("medley C++ consumer: all %d checks passed\n", g_checks);
  return 0;
}
