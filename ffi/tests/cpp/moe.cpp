// The MoE path of the C API: gating, the routing plan, permute, the expert
// GEMMs, the combine and the whole layer (CPU functions everywhere; the
// medley_cuda_moe_* functions on the GPU against the CPU).
#include "common.h"

namespace {

// ---------------------------------------------------------------------------
// Data and double-precision references.

std::vector<float> lcg_values(uint32_t seed, size_t n, float scale) {
  std::vector<float> v(n);
  for (auto &x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = scale * (((seed >> 8) & 0xffff) / 32768.0f - 1.0f);
  }
  return v;
}

std::vector<uint16_t> bf16_of(const std::vector<float> &v) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = to_bf16(v[i]);
  return o;
}

// The indices of the k largest values, descending, ties to the lower index.
std::vector<size_t> top_indices(const std::vector<double> &s, size_t k) {
  std::vector<size_t> order(s.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&s](size_t a, size_t b) { return s[a] > s[b]; });
  order.resize(k);
  return order;
}

struct Grouped {
  size_t k, n_group, topk_group;
  bool sigmoid, top2, renorm;
  double scale;
};

// Grouped, biased top-k routing of one row (DeepSeek-V3's definition).
void reference_grouped(const std::vector<double> &x, const std::vector<double> *bias, const Grouped &g,
                       std::vector<uint32_t> &ids, std::vector<double> &w) {
  const size_t e = x.size(), size = e / g.n_group;
  std::vector<double> s(e), sel(e);
  double m = *std::max_element(x.begin(), x.end()), z = 0;
  for (size_t i = 0; i < e; ++i) z += std::exp(x[i] - m);
  for (size_t i = 0; i < e; ++i) {
    s[i] = g.sigmoid ? 1.0 / (1.0 + std::exp(-x[i])) : std::exp(x[i] - m) / z;
    sel[i] = s[i] + (bias ? (*bias)[i] : 0.0);
  }
  std::vector<double> gs(g.n_group);
  for (size_t q = 0; q < g.n_group; ++q) {
    std::vector<double> grp(sel.begin() + q * size, sel.begin() + (q + 1) * size);
    std::sort(grp.begin(), grp.end(), [](double a, double b) { return a > b; });
    gs[q] = g.top2 ? grp[0] + grp[1] : grp[0];
  }
  std::vector<size_t> kept = top_indices(gs, g.topk_group);
  std::vector<double> masked(e, -INFINITY);
  for (size_t q : kept)
    for (size_t i = q * size; i < (q + 1) * size; ++i) masked[i] = sel[i];
  std::vector<size_t> pick = top_indices(masked, g.k);
  ids.resize(g.k);
  w.resize(g.k);
  double sum = 0;
  for (size_t j = 0; j < g.k; ++j) {
    ids[j] = (uint32_t)pick[j];
    w[j] = s[pick[j]];
    sum += w[j];
  }
  for (size_t j = 0; j < g.k; ++j) w[j] = (g.renorm && sum > 0 ? w[j] / sum : w[j]) * g.scale;
}

// Softmax over all E, top-k, renormalized or not; or the softmax over the
// kept logits (keep = true).
void reference_topk(const std::vector<double> &x, size_t k, bool renorm, std::vector<uint32_t> &ids,
                    std::vector<double> &w) {
  std::vector<size_t> pick = top_indices(x, k);
  double m = x[pick[0]], z = 0, zk = 0;
  for (double v : x) z += std::exp(v - m);
  for (size_t j = 0; j < k; ++j) zk += std::exp(x[pick[j]] - m);
  ids.resize(k);
  w.resize(k);
  for (size_t j = 0; j < k; ++j) {
    ids[j] = (uint32_t)pick[j];
    w[j] = std::exp(x[pick[j]] - m) / (renorm ? zk : z);
  }
}

// The block-padded plan (vLLM's moe_align_block_size, stable order).
struct PlanRef {
  std::vector<uint32_t> sorted, bexp, inverse;
  std::vector<uint64_t> offsets;
  uint32_t total = 0;
};

PlanRef reference_plan(const std::vector<uint32_t> &ids, uint32_t first, uint32_t last, size_t bm, size_t len,
                       size_t blocks) {
  const size_t n = ids.size(), l = last - first;
  PlanRef p;
  p.sorted.assign(len, (uint32_t)n);
  p.bexp.assign(blocks, 0xFFFFFFFFu);
  p.inverse.assign(n, 0xFFFFFFFFu);
  p.offsets.assign(l + 1, 0);
  std::vector<size_t> count(l, 0);
  for (uint32_t e : ids)
    if (e >= first && e < last) ++count[e - first];
  for (size_t e = 0; e < l; ++e) p.offsets[e + 1] = p.offsets[e] + (count[e] + bm - 1) / bm * bm;
  for (size_t e = 0; e < l; ++e)
    for (size_t b = p.offsets[e] / bm; b < p.offsets[e + 1] / bm; ++b) p.bexp[b] = (uint32_t)e;
  std::vector<uint64_t> cur(p.offsets.begin(), p.offsets.end() - 1);
  for (size_t i = 0; i < n; ++i)
    if (ids[i] >= first && ids[i] < last) {
      size_t pos = cur[ids[i] - first]++;
      p.sorted[pos] = (uint32_t)i;
      p.inverse[i] = (uint32_t)pos;
    }
  p.total = (uint32_t)p.offsets[l];
  return p;
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

// One small MoE layer: x [T, H], w13 [L, 2I, H], w2 [L, H, I] (bf16),
// the routing [T, k]; local experts [first, last) of E.
struct Layer {
  size_t t, h, i, k, e;
  uint32_t first, last;
  std::vector<uint16_t> x, w13, w2;
  std::vector<uint32_t> ids;
  std::vector<float> weights;
  size_t l() const { return last - first; }

  // The SwiGLU activation of token row xr through local expert le.
  std::vector<double> act(const double *xr, size_t le) const {
    std::vector<double> a(i);
    for (size_t n = 0; n < i; ++n) {
      double g = 0, u = 0;
      for (size_t c = 0; c < h; ++c) {
        g += xr[c] * from_bf16(w13[(le * 2 * i + n) * h + c]);
        u += xr[c] * from_bf16(w13[(le * 2 * i + i + n) * h + c]);
      }
      a[n] = silu(g) * u;
    }
    return a;
  }
  // W2 of local expert le applied to a.
  std::vector<double> down(const std::vector<double> &a, size_t le) const {
    std::vector<double> y(h);
    for (size_t o = 0; o < h; ++o) {
      double s = 0;
      for (size_t n = 0; n < i; ++n) s += a[n] * from_bf16(w2[(le * h + o) * i + n]);
      y[o] = s;
    }
    return y;
  }
  std::vector<double> reference() const {
    std::vector<double> out(t * h, 0.0), xr(h);
    for (size_t tok = 0; tok < t; ++tok) {
      for (size_t c = 0; c < h; ++c) xr[c] = from_bf16(x[tok * h + c]);
      for (size_t j = 0; j < k; ++j) {
        uint32_t id = ids[tok * k + j];
        double wt = weights[tok * k + j];
        if (id < first || id >= last || wt == 0.0) continue;
        std::vector<double> y = down(act(xr.data(), id - first), id - first);
        for (size_t c = 0; c < h; ++c) out[tok * h + c] += wt * y[c];
      }
    }
    return out;
  }
  medley_moe_experts experts() const {
    medley_moe_experts ex;
    ex.w13 = w13.data();
    ex.w13_len = w13.size();
    ex.w2 = w2.data();
    ex.w2_len = w2.size();
    ex.dtype = MEDLEY_DTYPE_BF16;
    ex.hidden = h;
    ex.inter = i;
    ex.range = medley_moe_range{first, last};
    return ex;
  }
  medley_moe_routing routing() const {
    return medley_moe_routing{ids.data(), ids.size(), weights.data(), weights.size(), k, e};
  }
};

Layer make_layer(size_t t, size_t h, size_t i, size_t k, size_t e, uint32_t first, uint32_t last, uint32_t seed) {
  Layer L{t, h, i, k, e, first, last, {}, {}, {}, {}, {}};
  const size_t l = last - first;
  L.x = bf16_of(lcg_values(seed, t * h, 1.0f));
  L.w13 = bf16_of(lcg_values(seed + 1, l * 2 * i * h, 0.15f));
  L.w2 = bf16_of(lcg_values(seed + 2, l * h * i, 0.15f));
  return L;
}

// The CPU layer of the C API into an f32 [T, H] output.
medley_status cpu_layer(const Layer &L, const std::vector<uint32_t> &ids, const std::vector<float> &w,
                        std::vector<float> &out, medley_report *rep) {
  medley_rows x{L.x.data(), L.x.size(), MEDLEY_DTYPE_BF16, L.t, L.h, 0};
  medley_moe_experts ex = L.experts();
  medley_moe_routing ro{ids.data(), ids.size(), w.data(), w.size(), L.k, L.e};
  size_t bytes = 0;
  CHECK_STATUS(medley_moe_layer_scratch_bytes(L.t, L.k, L.h, L.i, L.l(), &bytes), MEDLEY_STATUS_OK);
  std::vector<uint64_t> scratch(bytes / 8 + 1);
  out.assign(L.t * L.h, 0.0f);
  return medley_moe_layer(&x, &ex, &ro, scratch.data(), bytes, out.data(), out.size(), MEDLEY_DTYPE_F32, 0, rep);
}

double max_abs(const std::vector<double> &v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// ---------------------------------------------------------------------------
// CPU.

void cpu_grouped_gating() {
  const size_t T = 9, E = 64;
  std::vector<uint16_t> lg = bf16_of(lcg_values(21, T * E, 4.0f));
  std::vector<float> bias = lcg_values(22, E, 0.2f);
  for (size_t i = 0; i < E; ++i) lg[1 * E + i] = to_bf16(-INFINITY);  // row 1: fully masked
  lg[2 * E + 5] = 0x7fc0;                                             // row 2: NaN
  std::vector<double> bd(bias.begin(), bias.end());
  medley_rows x{lg.data(), lg.size(), MEDLEY_DTYPE_BF16, T, E, 0};
  for (int variant = 0; variant < 2; ++variant) {
    medley_moe_grouped_config cfg = medley_init(medley_moe_grouped_config_init);
    Grouped g{8, 8, 4, true, true, true, 2.5};
    if (variant == 1) {  // softmax scores, max group score, no bias, no renormalization
      cfg.scoring = MEDLEY_MOE_SCORING_SOFTMAX;
      cfg.group_score = MEDLEY_MOE_GROUP_SCORE_MAX;
      cfg.renormalize = 0;
      cfg.routed_scaling_factor = 1.0f;
      cfg.k = 6;
      cfg.topk_group = 3;
      g = Grouped{6, 8, 3, false, false, false, 1.0};
    }
    const size_t K = g.k;
    std::vector<uint32_t> ids(T * K, 42u);
    std::vector<float> w(T * K, 42.0f);
    medley_report rep = medley_init(medley_report_init);
    CHECK_STATUS(medley_moe_grouped_topk(&x, &cfg, variant == 0 ? bias.data() : nullptr, variant == 0 ? E : 0,
                                         ids.data(), ids.size(), w.data(), w.size(), &rep),
                 MEDLEY_STATUS_OK);
    CHECK(rep.masked_rows == 1 && rep.nan_rows == 1, "grouped report: %zu masked, %zu NaN", rep.masked_rows,
          rep.nan_rows);
    for (size_t t = 0; t < T; ++t) {
      if (t == 1 || t == 2) {
        for (size_t j = 0; j < K; ++j)
          CHECK(ids[t * K + j] == j && (t == 1 ? w[t * K + j] == 0.0f : std::isnan(w[t * K + j])),
                "grouped row %zu (masked/NaN) slot %zu: %u %g", t, j, ids[t * K + j], w[t * K + j]);
        continue;
      }
      std::vector<double> row(E);
      for (size_t i = 0; i < E; ++i) row[i] = from_bf16(lg[t * E + i]);
      std::vector<uint32_t> rid;
      std::vector<double> rw;
      reference_grouped(row, variant == 0 ? &bd : nullptr, g, rid, rw);
      for (size_t j = 0; j < K; ++j) {
        CHECK(ids[t * K + j] == rid[j], "grouped variant %d row %zu pick %zu: %u, want %u", variant, t, j,
              ids[t * K + j], rid[j]);
        CHECK(close_to(w[t * K + j], rw[j], 1e-6, 1e-5), "grouped variant %d row %zu weight %zu: %.9g, want %.9g",
              variant, t, j, w[t * K + j], rw[j]);
      }
    }
  }
  // The two top-k softmax variants over the same logits (row 1 masked,
  // row 2 NaN), against the C++ reference on the other rows.
  for (int variant = 0; variant < 3; ++variant) {
    const size_t K = 4;
    std::vector<uint32_t> ids(T * K, 42u);
    std::vector<float> w(T * K, 42.0f);
    CHECK_STATUS(variant < 2 ? medley_moe_topk_softmax(&x, K, (uint32_t)variant, ids.data(), ids.size(), w.data(),
                                                       w.size(), nullptr)
                             : medley_moe_keep_topk_softmax(&x, K, ids.data(), ids.size(), w.data(), w.size(), nullptr),
                 MEDLEY_STATUS_OK);
    for (size_t t = 3; t < T; ++t) {
      std::vector<double> row(E);
      for (size_t i = 0; i < E; ++i) row[i] = from_bf16(lg[t * E + i]);
      std::vector<uint32_t> rid;
      std::vector<double> rw;
      reference_topk(row, K, variant != 0, rid, rw);
      for (size_t j = 0; j < K; ++j)
        CHECK(ids[t * K + j] == rid[j] && close_to(w[t * K + j], rw[j], 1e-7, 1e-5),
              "top-k variant %d row %zu pick %zu: (%u, %.9g), want (%u, %.9g)", variant, t, j, ids[t * K + j],
              w[t * K + j], rid[j], rw[j]);
    }
  }
  // Failures leave the outputs untouched.
  medley_moe_grouped_config cfg = medley_init(medley_moe_grouped_config_init);
  std::vector<uint32_t> ids(T * 8, 42u);
  std::vector<float> w(T * 8, 42.0f);
  std::vector<float> nan_bias = bias;
  nan_bias[7] = NAN;
  CHECK_STATUS(medley_moe_grouped_topk(&x, &cfg, nan_bias.data(), E, ids.data(), ids.size(), w.data(), w.size(),
                                       nullptr),
               MEDLEY_STATUS_BAD_PARAMETER);
  CHECK_STATUS(medley_moe_grouped_topk(&x, &cfg, bias.data(), E - 1, ids.data(), ids.size(), w.data(), w.size(),
                                       nullptr),
               MEDLEY_STATUS_BAD_SHAPE);
  medley_moe_grouped_config bad = cfg;
  bad.scoring = 9;
  CHECK_STATUS(medley_moe_grouped_topk(&x, &bad, bias.data(), E, ids.data(), ids.size(), w.data(), w.size(),
                                       nullptr),
               MEDLEY_STATUS_BAD_PARAMETER);
  bad = cfg;
  bad.struct_size = 5;
  CHECK_STATUS(medley_moe_grouped_topk(&x, &bad, bias.data(), E, ids.data(), ids.size(), w.data(), w.size(),
                                       nullptr),
               MEDLEY_STATUS_STRUCT_SIZE);
  CHECK_STATUS(medley_moe_grouped_topk(&x, &cfg, bias.data(), E, reinterpret_cast<uint32_t *>(w.data()), w.size(),
                                       w.data(), w.size(), nullptr),
               MEDLEY_STATUS_OVERLAP);
  for (size_t i = 0; i < ids.size(); ++i) CHECK(ids[i] == 42u && w[i] == 42.0f, "grouped outputs written on failure");
  std::printf("cpu: grouped biased gating (sigmoid/top-2-sum with bias, softmax/max) matches the C++ reference\n");
}

void cpu_plan() {
  const size_t T = 13, K = 3, E = 10, BM = 4;
  const uint32_t first = 2, last = 8;
  std::vector<uint32_t> ids(T * K);
  for (size_t s = 0; s < ids.size(); ++s) ids[s] = (uint32_t)((s * 7 + s / 4) % E);
  for (auto &v : ids)
    if (v == 5) v = 6;  // expert 5: no slot
  ids[3] = 0xFFFFFFFFu;  // routed nowhere
  size_t len = 0, blocks = 0;
  CHECK_STATUS(medley_moe_block_padded_len(ids.size(), last - first, BM, &len, &blocks), MEDLEY_STATUS_OK);
  size_t pad = std::min<size_t>(last - first, ids.size()) * (BM - 1);
  CHECK(len == (ids.size() + pad + BM - 1) / BM * BM && blocks == len / BM, "padded length %zu, blocks %zu", len,
        blocks);
  PlanRef want = reference_plan(ids, first, last, BM, len, blocks);
  std::vector<uint32_t> sorted(len, 7u), bexp(blocks, 7u), inv(ids.size(), 7u);
  std::vector<uint64_t> off(last - first + 1, 7u);
  uint32_t total = 7;
  medley_moe_align_output out = medley_init(medley_moe_align_output_init);
  out.sorted_ids = sorted.data();
  out.sorted_ids_len = len;
  out.block_experts = bexp.data();
  out.block_experts_len = blocks;
  out.offsets = off.data();
  out.offsets_len = off.size();
  out.inverse = inv.data();
  out.inverse_len = inv.size();
  out.total = &total;
  CHECK_STATUS(medley_moe_align_block_size(ids.data(), ids.size(), E, medley_moe_range{first, last}, BM, &out),
               MEDLEY_STATUS_OK);
  CHECK(sorted == want.sorted && bexp == want.bexp && off == want.offsets && inv == want.inverse &&
            total == want.total,
        "the CPU plan differs from the C++ reference (total %u, want %u)", total, want.total);
  CHECK(off[4] == off[3], "expert 5 (local 3) is empty: offsets %llu %llu", (unsigned long long)off[3],
        (unsigned long long)off[4]);
  // Failures leave the outputs untouched.
  std::fill(sorted.begin(), sorted.end(), 9u);
  std::vector<uint32_t> bad_ids = ids;
  bad_ids[0] = 99;
  CHECK_STATUS(medley_moe_align_block_size(bad_ids.data(), ids.size(), E, medley_moe_range{first, last}, BM, &out),
               MEDLEY_STATUS_BAD_PARAMETER);
  CHECK_STATUS(medley_moe_align_block_size(ids.data(), ids.size(), E, medley_moe_range{first, 11}, BM, &out),
               MEDLEY_STATUS_BAD_PARAMETER);
  medley_moe_align_output short_out = out;
  short_out.block_experts_len = blocks - 1;
  CHECK_STATUS(
      medley_moe_align_block_size(ids.data(), ids.size(), E, medley_moe_range{first, last}, BM, &short_out),
      MEDLEY_STATUS_BAD_SHAPE);
  medley_moe_align_output alias = out;
  alias.inverse = sorted.data();
  CHECK_STATUS(medley_moe_align_block_size(ids.data(), ids.size(), E, medley_moe_range{first, last}, BM, &alias),
               MEDLEY_STATUS_OVERLAP);
  CHECK_STATUS(medley_moe_align_block_size(ids.data(), ids.size(), E, medley_moe_range{first, last}, 0, &out),
               MEDLEY_STATUS_BAD_PARAMETER);
  for (uint32_t v : sorted) CHECK(v == 9u, "plan written by a failed call");
  std::printf("cpu: block-padded routing plan (local range, empty expert, unrouted slot) matches the C++ "
              "reference\n");
}

void cpu_layer_checks() {
  // T = 11 (odd), H = 24, I = 16, k = 2; E = 7 experts, this rank holds 1..6;
  // expert 3 gets no slot, slot 5 has weight 0, slot 2 goes nowhere.
  Layer L = make_layer(11, 24, 16, 2, 7, 1, 6, 31);
  L.ids.resize(L.t * L.k);
  L.weights.resize(L.t * L.k);
  const uint32_t pattern[6] = {1, 4, 2, 0, 5, 6};
  for (size_t s = 0; s < L.ids.size(); ++s) {
    L.ids[s] = pattern[s % 6];
    L.weights[s] = 0.3f + 0.1f * (float)(s % 4);
  }
  L.ids[2] = 0xFFFFFFFFu;
  L.weights[5] = 0.0f;
  std::vector<float> out;
  medley_report rep = medley_init(medley_report_init);
  CHECK_STATUS(cpu_layer(L, L.ids, L.weights, out, &rep), MEDLEY_STATUS_OK);
  std::vector<double> want = L.reference();
  double scale = max_abs(want);
  int bad = 0;
  for (size_t j = 0; j < out.size(); ++j)
    if (!close_to(out[j], want[j], 1e-5 * scale, 1e-5) && bad++ < 5)
      std::fprintf(stderr, "  layer out[%zu]: %.9g, want %.9g\n", j, out[j], want[j]);
  CHECK(bad == 0, "the CPU layer differs from the C++ reference in %d values", bad);
  // bf16 output: the same values rounded once.
  {
    medley_rows x{L.x.data(), L.x.size(), MEDLEY_DTYPE_BF16, L.t, L.h, 0};
    medley_moe_experts ex = L.experts();
    medley_moe_routing ro = L.routing();
    size_t bytes = 0;
    CHECK_STATUS(medley_moe_layer_scratch_bytes(L.t, L.k, L.h, L.i, L.l(), &bytes), MEDLEY_STATUS_OK);
    std::vector<uint64_t> scratch(bytes / 8 + 1);
    std::vector<uint16_t> ob(L.t * L.h, 0);
    CHECK_STATUS(medley_moe_layer(&x, &ex, &ro, scratch.data(), bytes, ob.data(), ob.size(), MEDLEY_DTYPE_BF16, 0,
                                  nullptr),
                 MEDLEY_STATUS_OK);
    for (size_t j = 0; j < ob.size(); ++j) CHECK(ob[j] == to_bf16(out[j]), "bf16 layer out[%zu]", j);
    // Failures leave the output untouched.
    std::vector<float> o2(L.t * L.h, 42.0f);
    CHECK_STATUS(medley_moe_layer(&x, &ex, &ro, scratch.data(), bytes - 8, o2.data(), o2.size(), MEDLEY_DTYPE_F32,
                                  0, nullptr),
                 MEDLEY_STATUS_BAD_SHAPE);
    CHECK_STATUS(medley_moe_layer(&x, &ex, &ro, scratch.data(), bytes, o2.data(), o2.size(), 7, 0, nullptr),
                 MEDLEY_STATUS_BAD_PARAMETER);
    medley_moe_experts ex2 = ex;
    ex2.inter = 15;
    CHECK_STATUS(medley_moe_layer(&x, &ex2, &ro, scratch.data(), bytes, o2.data(), o2.size(), MEDLEY_DTYPE_F32, 0,
                                  nullptr),
                 MEDLEY_STATUS_BAD_SHAPE);
    CHECK_STATUS(medley_moe_layer(&x, &ex, &ro, o2.data(), std::min(bytes, o2.size() * 4), o2.data(), o2.size(),
                                  MEDLEY_DTYPE_F32, 0, nullptr),
                 MEDLEY_STATUS_OVERLAP);
    for (float v : o2) CHECK(v == 42.0f, "layer output written by a failed call");
  }
  std::printf("cpu: MoE layer (SwiGLU, routing weights, bf16, local range, empty expert, zero and unrouted "
              "slots) matches the C++ reference\n");
}

}  // namespace

void test_moe_cpu() {
  cpu_grouped_gating();
  cpu_plan();
  cpu_layer_checks();
}

#if defined(MEDLEY_CUDA)
namespace {

struct DevMem {
  std::vector<CUdeviceptr> ptrs;
  ~DevMem() {
    for (CUdeviceptr p : ptrs) cuMemFree_v2(p);
  }
  CUdeviceptr alloc(size_t bytes) {
    CUdeviceptr p = 0;
    if (cuMemAlloc_v2(&p, bytes < 256 ? 256 : bytes) != 0) return 0;
    ptrs.push_back(p);
    return p;
  }
};

template <class T>
bool upload(CUdeviceptr dst, const std::vector<T> &v, CUstream st) {
  return cuMemcpyHtoDAsync_v2(dst, v.data(), v.size() * sizeof(T), st) == 0;
}

template <class T>
bool download(std::vector<T> &v, CUdeviceptr src, size_t n, CUstream st) {
  v.assign(n, T());
  return cuMemcpyDtoHAsync_v2(v.data(), src, n * sizeof(T), st) == 0 && cuStreamSynchronize(st) == 0;
}

bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

void gpu_moe(CUstream st, medley_cuda_engine *engine) {
  const size_t T = 37, E = 16, K = 4, H = 256, I = 128;
  const uint32_t FIRST = 4, LAST = 16;  // this rank's experts
  const size_t L = LAST - FIRST, N = T * K;
  const uint32_t EMPTY = 9;  // an expert no token picks
  DevMem mem;
  std::vector<uint16_t> lg = bf16_of(lcg_values(41, T * E, 3.0f));
  std::vector<float> bias = lcg_values(42, E, 0.1f);
  for (size_t t = 0; t < T; ++t) lg[t * E + EMPTY] = to_bf16(-30.0f);
  bias[EMPTY] = -50.0f;
  CUdeviceptr dl = mem.alloc(lg.size() * 2), db = mem.alloc(E * 4), dids = mem.alloc(N * 4), dw = mem.alloc(N * 4);
  CHECK(dl && db && dids && dw, "cuMemAlloc failed");
  if (!(dl && db && dids && dw)) return;
  CHECK(upload(dl, lg, st) && upload(db, bias, st), "upload");
  medley_rows hx{lg.data(), lg.size(), MEDLEY_DTYPE_BF16, T, E, 0};
  medley_cuda_rows dx{dl, lg.size(), MEDLEY_DTYPE_BF16, T, E, 0};
  medley_moe_grouped_config gcfg = medley_init(medley_moe_grouped_config_init);
  gcfg.k = K;
  gcfg.n_group = 4;
  gcfg.topk_group = 2;
  // Gating: the three variants, bit for bit with the CPU (poisoned outputs).
  std::vector<uint32_t> ids;
  std::vector<float> wts;
  for (int variant = 0; variant < 3; ++variant) {
    std::vector<uint32_t> cids(N), gids;
    std::vector<float> cw(N), gw;
    medley_status cs, gs;
    CU(cuMemsetD8Async(dids, 0xff, N * 4, st));
    CU(cuMemsetD8Async(dw, 0xff, N * 4, st));
    if (variant == 0) {
      cs = medley_moe_topk_softmax(&hx, K, 1, cids.data(), N, cw.data(), N, nullptr);
      gs = medley_cuda_moe_topk_softmax(engine, st, &dx, K, 1, dids, N, dw, N);
    } else if (variant == 1) {
      cs = medley_moe_keep_topk_softmax(&hx, K, cids.data(), N, cw.data(), N, nullptr);
      gs = medley_cuda_moe_keep_topk_softmax(engine, st, &dx, K, dids, N, dw, N);
    } else {
      cs = medley_moe_grouped_topk(&hx, &gcfg, bias.data(), E, cids.data(), N, cw.data(), N, nullptr);
      gs = medley_cuda_moe_grouped_topk(engine, st, &dx, &gcfg, db, E, dids, N, dw, N);
    }
    CHECK(cs == MEDLEY_STATUS_OK && gs == MEDLEY_STATUS_OK, "MoE gating variant %d: CPU %s, GPU %s: %s", variant,
          medley_status_name(cs), medley_status_name(gs), last_message().c_str());
    CHECK(download(gids, dids, N, st) && download(gw, dw, N, st), "read back");
    CHECK(gids == cids && same_bits(gw, cw), "MoE gating variant %d: GPU and CPU differ", variant);
    for (uint32_t v : cids) CHECK(v != EMPTY, "expert %u was picked", EMPTY);
    if (variant == 2) {
      ids = cids;
      wts = cw;
    }
  }
  std::printf("gpu: MoE gating (top-k softmax, keep-top-k, grouped biased sigmoid) equals the CPU bit for bit\n");

  // The kernel choice, the plan.
  medley_cuda_moe_choice choice = medley_init(medley_cuda_moe_choice_init);
  medley_status cs = medley_cuda_moe_choose(engine, MEDLEY_DTYPE_BF16, N, L, MEDLEY_CUDA_MOE_GENERATION_ANY, &choice);
  CHECK(cs == MEDLEY_STATUS_OK, "medley_cuda_moe_choose: %s: %s", medley_status_name(cs), last_message().c_str());
  if (cs != MEDLEY_STATUS_OK) return;
  const size_t BM = choice.block_m;
  size_t len = 0, blocks = 0;
  CHECK_STATUS(medley_moe_block_padded_len(N, L, BM, &len, &blocks), MEDLEY_STATUS_OK);
  PlanRef want = reference_plan(ids, FIRST, LAST, BM, len, blocks);
  CUdeviceptr dsorted = mem.alloc(len * 4), dbexp = mem.alloc(blocks * 4), dtotal = mem.alloc(4),
              doff = mem.alloc((L + 1) * 8), dinv = mem.alloc(N * 4);
  CHECK(dsorted && dbexp && dtotal && doff && dinv, "cuMemAlloc failed");
  if (!(dsorted && dbexp && dtotal && doff && dinv)) return;
  CU(cuMemsetD8Async(dsorted, 0xff, len * 4, st));
  CU(cuMemsetD8Async(dbexp, 0xff, blocks * 4, st));
  CU(cuMemsetD8Async(dinv, 0xff, N * 4, st));
  medley_cuda_moe_align_output aout = medley_init(medley_cuda_moe_align_output_init);
  aout.sorted_ids = dsorted;
  aout.sorted_ids_len = len;
  aout.block_experts = dbexp;
  aout.block_experts_len = blocks;
  aout.total = dtotal;
  aout.offsets = doff;
  aout.offsets_len = L + 1;
  aout.inverse = dinv;
  aout.inverse_len = N;
  CHECK_STATUS(medley_cuda_moe_align(engine, st, dids, N, E, medley_moe_range{FIRST, LAST}, BM, &aout),
               MEDLEY_STATUS_OK);
  std::vector<uint32_t> gsorted, gbexp, ginv, gtotal;
  std::vector<uint64_t> goff;
  CHECK(download(gsorted, dsorted, len, st) && download(gbexp, dbexp, blocks, st) && download(ginv, dinv, N, st) &&
            download(gtotal, dtotal, 1, st) && download(goff, doff, L + 1, st),
        "read back");
  {
    std::vector<uint32_t> csorted(len), cbexp(blocks), cinv(N);
    std::vector<uint64_t> coff(L + 1);
    uint32_t ctotal = 0;
    medley_moe_align_output co = medley_init(medley_moe_align_output_init);
    co.sorted_ids = csorted.data();
    co.sorted_ids_len = len;
    co.block_experts = cbexp.data();
    co.block_experts_len = blocks;
    co.offsets = coff.data();
    co.offsets_len = L + 1;
    co.inverse = cinv.data();
    co.inverse_len = N;
    co.total = &ctotal;
    CHECK_STATUS(medley_moe_align_block_size(ids.data(), N, E, medley_moe_range{FIRST, LAST}, BM, &co),
                 MEDLEY_STATUS_OK);
    CHECK(gsorted == csorted && gbexp == cbexp && ginv == cinv && goff == coff && gtotal[0] == ctotal,
          "GPU plan differs from the CPU plan");
    CHECK(csorted == want.sorted && cinv == want.inverse && ctotal == want.total, "CPU plan differs from the C++ "
                                                                                  "reference");
    CHECK(coff[EMPTY - FIRST] == coff[EMPTY - FIRST + 1], "the empty expert owns rows");
  }
  std::printf("gpu: routing plan (block_m %zu, local experts %u..%u, an empty expert) equals the CPU bit for bit\n",
              BM, FIRST, LAST - 1);

  // Permute.
  Layer ly = make_layer(T, H, I, K, E, FIRST, LAST, 51);
  ly.ids = ids;
  ly.weights = wts;
  CUdeviceptr dxx = mem.alloc(T * H * 2), dxp = mem.alloc(len * H * 2), d13 = mem.alloc(ly.w13.size() * 2),
              d2 = mem.alloc(ly.w2.size() * 2), dact = mem.alloc(len * I * 2), dy = mem.alloc(len * H * 4),
              dout = mem.alloc(T * H * 4);
  CHECK(dxx && dxp && d13 && d2 && dact && dy && dout, "cuMemAlloc failed");
  if (!(dxx && dxp && d13 && d2 && dact && dy && dout)) return;
  CHECK(upload(dxx, ly.x, st) && upload(d13, ly.w13, st) && upload(d2, ly.w2, st), "upload");
  medley_cuda_rows vx{dxx, T * H, MEDLEY_DTYPE_BF16, T, H, 0};
  medley_cuda_rows vxp{dxp, len * H, MEDLEY_DTYPE_BF16, len, H, 0};
  CU(cuMemsetD8Async(dxp, 0xff, len * H * 2, st));
  CHECK_STATUS(medley_cuda_moe_permute(engine, st, &vx, K, dsorted, len, dtotal, &vxp), MEDLEY_STATUS_OK);
  std::vector<uint16_t> gxp;
  CHECK(download(gxp, dxp, len * H, st), "read back");
  {
    int bad = 0;
    for (size_t p = 0; p < len; ++p)
      for (size_t c = 0; c < H; ++c) {
        uint16_t w = (p < want.total && want.sorted[p] < N) ? ly.x[want.sorted[p] / K * H + c] : 0;
        if (gxp[p * H + c] != w) ++bad;
      }
    CHECK(bad == 0, "permute: %d elements differ from the gather", bad);
  }
  std::printf("gpu: permute into plan order equals the host gather (padding rows zero)\n");

  // GEMM1 (gathering, or from the permuted rows for a wgmma configuration).
  const bool wgmma1 = choice.generation1 == MEDLEY_CUDA_MOE_GENERATION_WGMMA;
  medley_cuda_moe_plan plan{dsorted, len, dbexp, blocks, dtotal, BM, N, K};
  medley_cuda_rows vw13{d13, ly.w13.size(), MEDLEY_DTYPE_BF16, L * 2 * I, H, 0};
  medley_cuda_rows vact{dact, len * I, MEDLEY_DTYPE_BF16, len, I, 0};
  CU(cuMemsetD8Async(dact, 0xff, len * I * 2, st));
  medley_status s1 = medley_cuda_moe_gemm1(engine, st, choice.gemm1, wgmma1 ? &vxp : &vx, wgmma1 ? 1 : 0, &plan,
                                           &vw13, &vact);
  CHECK(s1 == MEDLEY_STATUS_OK, "GEMM1: %s: %s", medley_status_name(s1), last_message().c_str());
  std::vector<uint16_t> gact;
  CHECK(download(gact, dact, len * I, st), "read back");
  {
    int bad = 0, unpoisoned = 0;
    std::vector<double> xr(H);
    for (size_t p = 0; p < len; ++p) {
      bool real = p < want.total && want.sorted[p] < N;
      if (!real) {
        for (size_t n = 0; n < I; ++n) unpoisoned += gact[p * I + n] != 0xffff;
        continue;
      }
      size_t tok = want.sorted[p] / K, le = want.bexp[p / BM];
      for (size_t c = 0; c < H; ++c) xr[c] = from_bf16(ly.x[tok * H + c]);
      std::vector<double> a = ly.act(xr.data(), le);
      double sc = max_abs(a);
      for (size_t n = 0; n < I; ++n)
        if (!close_to(from_bf16(gact[p * I + n]), a[n], 1e-2 * sc + 1e-3, 1e-2) && bad++ < 5)
          std::fprintf(stderr, "  GEMM1 pos %zu col %zu: %.6g, want %.6g\n", p, n, from_bf16(gact[p * I + n]), a[n]);
    }
    CHECK(bad == 0, "GEMM1: %d activations off", bad);
    CHECK(unpoisoned == 0, "GEMM1 wrote %d padding values", unpoisoned);
  }
  std::printf("gpu: GEMM1 (%s, SwiGLU) matches the C++ reference within bf16 rounding\n", wgmma1 ? "wgmma" : "mma");

  // GEMM2 over the GPU's activations, with the routing weights.
  medley_cuda_rows vw2{d2, ly.w2.size(), MEDLEY_DTYPE_BF16, L * H, I, 0};
  medley_cuda_rows vy{dy, len * H, MEDLEY_DTYPE_F32, len, H, 0};
  CU(cuMemsetD8Async(dy, 0xff, len * H * 4, st));
  medley_status s2 = medley_cuda_moe_gemm2(engine, st, choice.gemm2, &vact, &plan, &vw2, dw, N, &vy);
  CHECK(s2 == MEDLEY_STATUS_OK, "GEMM2: %s: %s", medley_status_name(s2), last_message().c_str());
  std::vector<float> gy;
  CHECK(download(gy, dy, len * H, st), "read back");
  {
    int bad = 0;
    for (size_t p = 0; p < len; ++p) {
      if (!(p < want.total && want.sorted[p] < N)) continue;
      size_t le = want.bexp[p / BM];
      std::vector<double> a(I);
      for (size_t n = 0; n < I; ++n) a[n] = from_bf16(gact[p * I + n]);
      std::vector<double> y = ly.down(a, le);
      double wt = wts[want.sorted[p]], sc = max_abs(y) * std::fabs(wt);
      for (size_t c = 0; c < H; ++c)
        if (!close_to(gy[p * H + c], wt * y[c], 1e-4 * sc + 1e-6, 1e-4) && bad++ < 5)
          std::fprintf(stderr, "  GEMM2 pos %zu col %zu: %.9g, want %.9g\n", p, c, gy[p * H + c], wt * y[c]);
    }
    CHECK(bad == 0, "GEMM2: %d outputs off", bad);
  }
  std::printf("gpu: GEMM2 (%s, routing weight) matches the C++ reference\n",
              choice.generation2 == MEDLEY_CUDA_MOE_GENERATION_WGMMA ? "wgmma" : "mma");

  // The k-way combine of GEMM2's rows (prescaled).
  medley_cuda_rows vout{dout, T * H, MEDLEY_DTYPE_F32, T, H, 0};
  CU(cuMemsetD8Async(dout, 0xff, T * H * 4, st));
  CHECK_STATUS(medley_cuda_moe_combine(engine, st, &vy, K, dinv, N, dw, N, 1, &vout), MEDLEY_STATUS_OK);
  std::vector<float> gout;
  CHECK(download(gout, dout, T * H, st), "read back");
  {
    int bad = 0;
    for (size_t t = 0; t < T; ++t)
      for (size_t c = 0; c < H; ++c) {
        float acc = 0.0f;  // f32 in j order, as the kernel sums
        for (size_t j = 0; j < K; ++j) {
          uint32_t pos = want.inverse[t * K + j];
          if (pos == 0xFFFFFFFFu || wts[t * K + j] == 0.0f) continue;
          acc += gy[pos * H + c];
        }
        if (std::memcmp(&acc, &gout[t * H + c], 4) != 0 && bad++ < 5)
          std::fprintf(stderr, "  combine token %zu col %zu: %.9g, want %.9g\n", t, c, gout[t * H + c], acc);
      }
    CHECK(bad == 0, "combine: %d outputs differ from the j-order f32 sum", bad);
  }
  std::printf("gpu: k-way combine (prescaled) equals the j-order f32 sum bit for bit\n");

  // The whole layer in one call against the CPU layer.
  size_t ws_bytes = 0;
  CHECK_STATUS(medley_cuda_moe_layer_workspace_bytes(&choice, T, K, L, H, I, MEDLEY_DTYPE_BF16, &ws_bytes),
               MEDLEY_STATUS_OK);
  CUdeviceptr ws = mem.alloc(ws_bytes);
  CHECK(ws != 0, "cuMemAlloc of the workspace failed");
  if (!ws) return;
  medley_cuda_moe_experts dex{d13, ly.w13.size(), d2, ly.w2.size(), MEDLEY_DTYPE_BF16, H, I, {FIRST, LAST}};
  medley_cuda_moe_routing dro{dids, N, dw, N, K, E};
  CU(cuMemsetD8Async(dout, 0xff, T * H * 4, st));
  medley_status sl = medley_cuda_moe_layer(engine, st, &vx, &dex, &dro, &choice, ws, ws_bytes, &vout);
  CHECK(sl == MEDLEY_STATUS_OK, "GPU layer: %s: %s", medley_status_name(sl), last_message().c_str());
  CHECK(download(gout, dout, T * H, st), "read back");
  std::vector<float> cpu;
  CHECK_STATUS(cpu_layer(ly, ids, wts, cpu, nullptr), MEDLEY_STATUS_OK);
  {
    std::vector<double> ref = ly.reference();
    double sc = max_abs(ref);
    int bad = 0, bad_ref = 0;
    for (size_t j = 0; j < T * H; ++j) {
      if (!close_to(gout[j], cpu[j], 2e-2 * sc, 1e-2) && bad++ < 5)
        std::fprintf(stderr, "  layer out[%zu]: GPU %.6g, CPU %.6g\n", j, gout[j], cpu[j]);
      if (!close_to(cpu[j], ref[j], 1e-5 * sc, 1e-5)) ++bad_ref;
    }
    CHECK(bad == 0, "GPU layer: %d outputs off the CPU layer", bad);
    CHECK(bad_ref == 0, "CPU layer: %d outputs off the C++ reference", bad_ref);
  }
  std::printf("gpu: whole MoE layer in one call (T = %zu, H = %zu, I = %zu, k = %zu, experts %u..%u of %zu) matches "
              "the CPU layer\n",
              T, H, I, K, FIRST, LAST - 1, E);

  // The whole layer again with each GEMM generation forced (mma, and
  // wgmma where the device has it: compute capability 9.0), so that both
  // kernel families run through the C ABI whatever the tuning table picks.
  for (int g = 0; g < 2; ++g) {
    const uint32_t gen = g == 0 ? MEDLEY_CUDA_MOE_GENERATION_MMA : MEDLEY_CUDA_MOE_GENERATION_WGMMA;
    const char *gname = g == 0 ? "mma" : "wgmma";
    medley_cuda_moe_choice forced = medley_init(medley_cuda_moe_choice_init);
    medley_status fs = medley_cuda_moe_choose(engine, MEDLEY_DTYPE_BF16, N, L, gen, &forced);
    if (fs != MEDLEY_STATUS_OK) {
      // Only a device without wgmma (compute capability below 9.0) may
      // refuse it.
      int major = 0;
      CUdevice dev0 = 0;
      bool has_wgmma = cuCtxGetDevice(&dev0) == 0 &&
                       cuDeviceGetAttribute(&major, 75 /* COMPUTE_CAPABILITY_MAJOR */, dev0) == 0 && major >= 9;
      CHECK(g == 1 && !has_wgmma, "medley_cuda_moe_choose(%s): %s: %s", gname, medley_status_name(fs),
            last_message().c_str());
      std::printf("gpu: no %s GEMMs on this device (%s)\n", gname, medley_status_name(fs));
      continue;
    }
    CHECK(forced.generation1 == gen && forced.generation2 == gen, "choose(%s) picked generations %u, %u", gname,
          forced.generation1, forced.generation2);
    size_t fws_bytes = 0;
    CHECK_STATUS(medley_cuda_moe_layer_workspace_bytes(&forced, T, K, L, H, I, MEDLEY_DTYPE_BF16, &fws_bytes),
                 MEDLEY_STATUS_OK);
    CUdeviceptr fws = mem.alloc(fws_bytes);
    CHECK(fws != 0, "cuMemAlloc of the workspace failed");
    if (!fws) return;
    CU(cuMemsetD8Async(dout, 0xff, T * H * 4, st));
    medley_status fl = medley_cuda_moe_layer(engine, st, &vx, &dex, &dro, &forced, fws, fws_bytes, &vout);
    CHECK(fl == MEDLEY_STATUS_OK, "GPU layer (%s): %s: %s", gname, medley_status_name(fl), last_message().c_str());
    CHECK(download(gout, dout, T * H, st), "read back");
    std::vector<double> ref = ly.reference();
    double sc = max_abs(ref);
    int bad = 0;
    for (size_t j = 0; j < T * H; ++j)
      if (!close_to(gout[j], cpu[j], 2e-2 * sc, 1e-2) && bad++ < 5)
        std::fprintf(stderr, "  layer (%s) out[%zu]: GPU %.6g, CPU %.6g\n", gname, j, gout[j], cpu[j]);
    CHECK(bad == 0, "GPU layer (%s): %d outputs off the CPU layer", gname, bad);
    std::printf("gpu: whole MoE layer with %s GEMMs (GEMM1 #%u, GEMM2 #%u, block_m %zu) matches the CPU layer\n",
                gname, (unsigned)forced.gemm1, (unsigned)forced.gemm2, (size_t)forced.block_m);
  }

  // Bad calls enqueue nothing: poison, fail, read back the poison.
  CU(cuMemsetD8Async(dout, 0x7f, T * H * 4, st));
  CHECK_STATUS(medley_cuda_moe_layer(engine, st, &vx, &dex, &dro, &choice, ws, ws_bytes - 1, &vout),
               MEDLEY_STATUS_BAD_SHAPE);
  medley_cuda_moe_experts bad_ex = dex;
  bad_ex.inter = I + 4;
  CHECK_STATUS(medley_cuda_moe_layer(engine, st, &vx, &bad_ex, &dro, &choice, ws, ws_bytes, &vout),
               MEDLEY_STATUS_BAD_PARAMETER);
  CHECK_STATUS(medley_cuda_moe_combine(engine, st, &vy, K, dinv, N, dw, N - 1, 1, &vout), MEDLEY_STATUS_BAD_SHAPE);
  CHECK(download(gout, dout, T * H, st), "read back");
  bool poisoned = true;
  for (float v : gout) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    poisoned = poisoned && u == 0x7f7f7f7fu;
  }
  CHECK(poisoned, "a failed GPU MoE call wrote its output");
  std::printf("gpu: failed MoE calls enqueue nothing\n");
}

}  // namespace

void test_moe_gpu() {
  CUresult init = cuInit(0);
  if (init != 0) {
    std::printf("gpu: MoE skipped: cuInit returned %d\n", init);
    // The GPU MoE functions still check their arguments first.
    medley_cuda_moe_choice c = medley_init(medley_cuda_moe_choice_init);
    c.gemm1 = 5;
    CHECK_STATUS(medley_cuda_moe_choose(nullptr, MEDLEY_DTYPE_BF16, 8, 2, 9, &c), MEDLEY_STATUS_BAD_PARAMETER);
    CHECK_STATUS(medley_cuda_moe_choose(nullptr, MEDLEY_DTYPE_BF16, 8, 2, 0, &c), MEDLEY_STATUS_NULL_ARGUMENT);
    CHECK(c.gemm1 == 5, "a failed choose wrote");
    return;
  }
  CUdevice dev;
  CUcontext ctx;
  CU(cuDeviceGet(&dev, 0));
  CU(cuDevicePrimaryCtxRetain(&ctx, dev));
  CU(cuCtxPushCurrent_v2(ctx));
  CUstream stream;
  CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
  medley_cuda_engine *engine = nullptr;
  medley_status s = medley_cuda_engine_new(stream, &engine);
  CHECK(s == MEDLEY_STATUS_OK, "medley_cuda_engine_new: %s (CUDA %d)", medley_status_name(s),
        medley_last_cuda_error());
  if (s == MEDLEY_STATUS_OK) {
    gpu_moe(stream, engine);
    CHECK(cuStreamSynchronize(stream) == 0, "stream error");
    CHECK_STATUS(medley_cuda_engine_destroy(engine), MEDLEY_STATUS_OK);
  }
  CU(cuStreamDestroy_v2(stream));
  CUcontext popped;
  CU(cuCtxPopCurrent_v2(&popped));
  CU(cuDevicePrimaryCtxRelease_v2(dev));
}
#endif
