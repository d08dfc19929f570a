/* A C99 program against the installed medley: the header compiles as strict
 * C99, the library links from C (CMake's medley::medley, or pkg-config's
 * medley / medley-static), and one ensemble call runs. Built by
 * CMakeLists.txt beside it and by .ci/cmake-consumer.sh through pkg-config.
 * Define MEDLEY_EXPECT_VERSION ("0.1.0") to check medley_version(). */
#include "medley.h"

#include <stdio.h>
#include <string.h>

static int checks, failures;
#define CHECK(cond, msg)                                \
  do {                                                  \
    checks++;                                           \
    if (!(cond)) {                                      \
      failures++;                                       \
      fprintf(stderr, "check failed: %s\n", msg);       \
    }                                                   \
  } while (0)

int main(void) {
  float a[4] = {2.0f, 1.0f, 0.0f, -1.0f}, b[4] = {0.0f, 1.0f, 2.0f, 3.0f};
  const float weights[2] = {0.7f, 0.3f};
  medley_model models[2];
  medley_ensemble_config cfg;
  medley_ensemble_output out;
  float log_probs[4];
  uint32_t best = 99;
  medley_status s;

  CHECK(medley_abi_version() == MEDLEY_ABI_VERSION, "the library's ABI version is the header's");
#if defined(MEDLEY_EXPECT_VERSION)
  CHECK(strcmp(medley_version(), MEDLEY_EXPECT_VERSION) == 0, "medley_version() is the package version");
#endif
#if defined(MEDLEY_CUDA)
  CHECK(medley_has_cuda(), "a CUDA header (no MEDLEY_NO_CUDA) links the CUDA build");
#else
  CHECK(!medley_has_cuda(), "MEDLEY_NO_CUDA links the CPU-only build");
#endif

  memset(models, 0, sizeof models);
  models[0].logits.data = a;
  models[1].logits.data = b;
  models[0].logits.data_len = models[1].logits.data_len = 4;
  models[0].logits.dtype = models[1].logits.dtype = MEDLEY_DTYPE_F32;
  models[0].logits.rows = models[1].logits.rows = 1;
  models[0].logits.len = models[1].logits.len = 4;
  models[0].temperature = models[1].temperature = 1.0f;
  CHECK(medley_ensemble_config_init(&cfg, sizeof cfg) == MEDLEY_STATUS_OK, "config init");
  cfg.weights = weights;
  cfg.weights_len = 2;
  CHECK(medley_ensemble_output_init(&out, sizeof out) == MEDLEY_STATUS_OK, "output init");
  out.log_probs = log_probs;
  out.log_probs_len = 4;
  out.argmax = &best;
  out.argmax_len = 1;
  s = medley_ensemble_combine(models, 2, &cfg, 1, 4, &out, NULL);
  if (s != MEDLEY_STATUS_OK) {
    char msg[256];
    medley_last_error_message(msg, sizeof msg, NULL);
    fprintf(stderr, "%s: %s\n", medley_status_name(s), msg);
  }
  CHECK(s == MEDLEY_STATUS_OK, "medley_ensemble_combine succeeds");
  /* 0.7 softmax(a) + 0.3 softmax(b): token 0 (0.7 * 0.644 = 0.451) wins. */
  CHECK(best == 0, "the argmax of the mixture is token 0");

  if (failures) {
    printf("medley C program: %d of %d checks FAILED\n", failures, checks);
    return 1;
  }
  printf("medley C program (%s build): all %d checks passed\n", medley_has_cuda() ? "CUDA" : "CPU-only", checks);
  return 0;
}
