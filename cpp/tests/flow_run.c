/* One SD3 / FLUX generation through the C API with no Python in the process, so that AddressSanitizer (CPU) and
 * compute-sanitizer or CUDA_LAUNCH_BLOCKING=1 (GPU) see only libmegafusion and libtorch. Usage:
 *   megafusion_flow_run ENGINES MODEL DEVICE STAGES SEED GUIDANCE RELAY GRAPHS IDS OUT.rgb
 * IDS: one line per encoder, "prompt|negative ENCODER id id ...", as benchmarks/lab/flow_capi_parity.py --ids-out
 * writes them; OUT.rgb: the image's raw RGB8 rows. Prints "WxH graphs on|off, C captures, R replays"; exit status
 * 0, 2 on a usage error, else the failing call's mf_status. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "megafusion/megafusion.h"

enum { kMaxIds = 4096 };

static int fail(const char* what, mf_status s) {
  fprintf(stderr, "megafusion_flow_run: %s: %s\n", what, mf_last_error());
  return (int)s;
}

/* Sets every line of `path` on `in`; returns 0, else 2 with one line naming the file and line. */
static int read_ids(const char* path, mf_inputs* in) {
  FILE* f = fopen(path, "r");
  if (!f) return fprintf(stderr, "megafusion_flow_run: cannot open ids file %s\n", path), 2;
  static int32_t ids[kMaxIds];
  char which[16], enc[16];
  int line = 0, rc = 0;
  while (rc == 0 && fscanf(f, "%15s %15s", which, enc) == 2) {
    size_t n = 0;
    long v;
    ++line;
    while (n < kMaxIds && fscanf(f, "%ld", &v) == 1) ids[n++] = (int32_t)v;
    const int negative = strcmp(which, "negative") == 0;
    if (!negative && strcmp(which, "prompt") != 0) {
      fprintf(stderr, "megafusion_flow_run: %s line %d: '%s' is neither prompt nor negative\n", path, line, which);
      rc = 2;
    } else if ((negative ? mf_inputs_set_negative_tokens : mf_inputs_set_tokens)(in, enc, ids, n) != MF_OK) {
      rc = fail(path, MF_ERROR_INVALID_ARGUMENT);
    }
  }
  fclose(f);
  return rc;
}

int main(int argc, char** argv) {
  if (argc != 11) {
    fprintf(stderr, "usage: %s ENGINES MODEL DEVICE STAGES SEED GUIDANCE RELAY GRAPHS IDS OUT.rgb\n", argv[0]);
    return 2;
  }
  mf_context_options o = {argv[1], argv[2], argv[3], 0};
  mf_context* ctx = NULL;
  mf_status s = mf_context_create(&o, &ctx);
  if (s != MF_OK) return fail("mf_context_create", s);
  mf_generate_params p;
  mf_generate_params_init(&p);
  p.stages = argv[4];
  p.seed = strtoull(argv[5], NULL, 10);
  p.guidance = strtof(argv[6], NULL);
  p.relay = argv[7];
  p.dilation = 1;
  const int graphs = atoi(argv[8]);
  int rc = 0;
  mf_inputs* in = NULL;
  uint8_t* rgb = NULL;
  int w = 0, h = 0;
  if ((s = mf_set_cuda_graphs(ctx, graphs)) != MF_OK) rc = fail("mf_set_cuda_graphs", s);
  if (rc == 0 && (s = mf_inputs_create(&in)) != MF_OK) rc = fail("mf_inputs_create", s);
  if (rc == 0) rc = read_ids(argv[9], in);
  if (rc == 0 && (s = mf_output_size(ctx, &p, &w, &h)) != MF_OK) rc = fail("mf_output_size", s);
  if (rc == 0) rgb = (uint8_t*)malloc((size_t)w * h * 3);
  if (rc == 0 && (s = mf_generate_with(ctx, &p, in, rgb, (size_t)w * h * 3)) != MF_OK)
    rc = fail("mf_generate_with", s);
  if (rc == 0) {
    FILE* out = fopen(argv[10], "wb");
    if (!out || fwrite(rgb, 1, (size_t)w * h * 3, out) != (size_t)w * h * 3) {
      fprintf(stderr, "megafusion_flow_run: cannot write %s\n", argv[10]);
      rc = 2;
    }
    if (out) fclose(out);
    uint64_t captures = 0, replays = 0;
    mf_graph_counters(ctx, &captures, &replays);
    printf("%dx%d graphs %s, %llu captures, %llu replays\n", w, h, graphs ? "on" : "off",
           (unsigned long long)captures, (unsigned long long)replays);
  }
  free(rgb);
  mf_inputs_destroy(in);
  mf_context_destroy(ctx);
  return rc;
}
