// Shared by the C++ consumer's files (consumer.cpp, merge.cpp, moe.cpp):
// the C API, the CUDA driver declarations (no CUDA header needed), the
// checking macros and small numeric helpers. C++17 (inline variables).
#pragma once

#include "medley.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#if defined(MEDLEY_CUDA)
// ---------------------------------------------------------------------------
// The CUDA driver API entry points this program uses (ABI-stable names).
extern "C" {
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef unsigned long long CUdeviceptr;
CUresult cuInit(unsigned int flags);
CUresult cuDeviceGet(CUdevice *device, int ordinal);
CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice device);
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device);
CUresult cuCtxPushCurrent_v2(CUcontext ctx);
CUresult cuCtxPopCurrent_v2(CUcontext *ctx);
CUresult cuStreamCreate(CUstream *stream, unsigned int flags);
CUresult cuStreamDestroy_v2(CUstream stream);
CUresult cuStreamSynchronize(CUstream stream);
CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes);
CUresult cuMemFree_v2(CUdeviceptr ptr);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t bytes, CUstream stream);
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t bytes, CUstream stream);
CUresult cuMemsetD8Async(CUdeviceptr ptr, unsigned char value, size_t bytes, CUstream stream);
CUresult cuCtxGetDevice(CUdevice *device);
CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device);
}
inline const unsigned int CU_STREAM_NON_BLOCKING = 1;
#endif  // MEDLEY_CUDA

// ---------------------------------------------------------------------------
// Checking helpers.

inline int g_failures = 0;
inline int g_checks = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    ++g_checks;                                                            \
    if (!(cond)) {                                                         \
      ++g_failures;                                                        \
      std::fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                   \
      std::fprintf(stderr, "\n");                                          \
    }                                                                      \
  } while (0)

inline std::string last_message() {
  char buf[512];
  size_t n = 0;
  medley_status s = medley_last_error_message(buf, sizeof buf, &n);
  if (s != MEDLEY_STATUS_OK) return "<medley_last_error_message failed>";
  return std::string(buf);
}

#define CHECK_STATUS(call, want)                                                    \
  do {                                                                              \
    medley_status s_ = (call);                                                      \
    CHECK(s_ == (want), "%s returned %s (%d), want %s: %s", #call,                  \
          medley_status_name(s_), (int)s_, medley_status_name(want), last_message().c_str()); \
  } while (0)

inline const double NEG_INF = -std::numeric_limits<double>::infinity();

// |got - want| <= abs + rel |want|, with -inf matching -inf only.
inline bool close_to(double got, double want, double abs_tol, double rel_tol) {
  if (std::isinf(want) || std::isinf(got)) return got == want;
  if (std::isnan(got) || std::isnan(want)) return false;
  return std::fabs(got - want) <= abs_tol + rel_tol * std::fabs(want);
}

// bfloat16 round-to-nearest-even, and back.
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}


// A versioned struct filled by its _init function at this header's size
// (the library sets struct_size).
template <class T>
T medley_init(medley_status (*init)(T *, size_t)) {
  T v;
  std::memset(&v, 0, sizeof v);
  medley_status s = init(&v, sizeof v);
  CHECK(s == MEDLEY_STATUS_OK, "init of a %zu-byte struct returned %s", sizeof v, medley_status_name(s));
  return v;
}

#if defined(MEDLEY_CUDA)
#define CU(call)                                                                 \
  do {                                                                           \
    CUresult r_ = (call);                                                        \
    if (r_ != 0) {                                                               \
      std::fprintf(stderr, "FAILED %s:%d: %s returned %d\n", __FILE__, __LINE__, #call, r_); \
      ++g_failures;                                                              \
      return;                                                                    \
    }                                                                            \
  } while (0)
#endif

// The checks of the other files (each prints one line per group).
void test_merge_cpu();
void test_moe_cpu();
#if defined(MEDLEY_CUDA)
void test_moe_gpu();
#endif
