/* Bad calls through libmegafusion's C API return a status code and a message naming the problem; nothing
 * aborts. Written in C so the header is checked as C. Usage: megafusion_c_api_test ENGINE_DIR MODEL
 * (engines from mf-build-engines --backend aoti covering 128x128 to 256x256, as the Python tests build). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "megafusion/megafusion.h"

static int failures = 0;

static void expect(const char* what, mf_status got, mf_status want, const char* needle) {
  const char* msg = mf_last_error();
  if (got != want || (needle && !strstr(msg, needle))) {
    fprintf(stderr, "FAIL %s: status %d (want %d), message '%s' (want it to contain '%s')\n", what, (int)got,
            (int)want, msg, needle ? needle : "");
    ++failures;
  } else {
    printf("ok   %s: %s\n", what, msg);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s ENGINE_DIR MODEL\n", argv[0]);
    return 2;
  }
  const char* dir = argv[1];
  const char* model = argv[2];
  mf_context* ctx = (mf_context*)1;
  mf_context_options o = {dir, model, "cpu", 0};

  expect("null options", mf_context_create(NULL, &ctx), MF_ERROR_INVALID_ARGUMENT, "options is NULL");
  if (ctx != NULL) {
    fprintf(stderr, "FAIL null options: *out not reset\n");
    ++failures;
  }
  expect("null out", mf_context_create(&o, NULL), MF_ERROR_INVALID_ARGUMENT, "out");
  mf_context_options missing = {"/nonexistent/engines", model, "cpu", 0};
  expect("missing engine folder", mf_context_create(&missing, &ctx), MF_ERROR_ENGINE, "/nonexistent/engines");
  mf_context_options unknown = {dir, "sd9", "cpu", 0};
  expect("unknown model", mf_context_create(&unknown, &ctx), MF_ERROR_INVALID_ARGUMENT, "'sd9'");
  mf_context_options bad_device = {dir, model, "tpu", 0};
  expect("unknown device", mf_context_create(&bad_device, &ctx), MF_ERROR_INVALID_ARGUMENT, "'tpu'");
  mf_context_options null_dir = {NULL, model, "cpu", 0};
  expect("null engine_dir", mf_context_create(&null_dir, &ctx), MF_ERROR_INVALID_ARGUMENT, "engine_dir");

  expect("create", mf_context_create(&o, &ctx), MF_OK, NULL);
  if (!ctx) return 1;
  const int encoders = mf_num_text_encoders(ctx);

  int32_t ids[MF_TOKEN_LENGTH] = {0};
  mf_generate_params p;
  mf_generate_params_init(&p);
  for (int i = 0; i < encoders; ++i) p.prompt_ids[i] = ids, p.negative_ids[i] = ids;
  p.stages = "128x128:2,256x256:1";
  size_t bytes = 256 * 256 * 3, big = 512 * 512 * 3;
  uint8_t* rgb = (uint8_t*)malloc(big);

  expect("null ctx", mf_generate(NULL, &p, rgb, bytes), MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
  expect("null params", mf_generate(ctx, NULL, rgb, bytes), MF_ERROR_INVALID_ARGUMENT, "params is NULL");
  expect("null rgb", mf_generate(ctx, &p, NULL, bytes), MF_ERROR_INVALID_ARGUMENT, "rgb buffer is NULL");
  expect("small buffer", mf_generate(ctx, &p, rgb, bytes - 1), MF_ERROR_BUFFER_TOO_SMALL, "256x256 RGB8 needs 196608");

  p.stages = "128x128:2,512x512:1";
  expect("size outside the engines", mf_generate(ctx, &p, rgb, big), MF_ERROR_UNSUPPORTED_SIZE,
         "128x128 to 256x256");
  p.stages = "128x128:2,250x250:1";
  expect("size the model refuses", mf_generate(ctx, &p, rgb, bytes), MF_ERROR_UNSUPPORTED_SIZE, "250");
  p.stages = "banana";
  expect("malformed stages", mf_generate(ctx, &p, rgb, bytes), MF_ERROR_UNSUPPORTED_SIZE, "banana");
  p.stages = "128x128:2,256x256:1";
  p.width = 256;
  expect("width without height", mf_generate(ctx, &p, rgb, bytes), MF_ERROR_INVALID_ARGUMENT, "256x0");
  p.width = 0;
  p.relay = "telepathy";
  expect("unknown relay", mf_generate(ctx, &p, rgb, bytes), MF_ERROR_INVALID_ARGUMENT, "'telepathy'");
  p.relay = "pixel";
  p.dilation = 0;
  expect("dilation 0", mf_generate(ctx, &p, rgb, bytes), MF_ERROR_INVALID_ARGUMENT, "dilation");
  p.dilation = 2;
  p.prompt_ids[0] = NULL;
  expect("null prompt ids", mf_generate(ctx, &p, rgb, bytes), MF_ERROR_INVALID_ARGUMENT, "prompt_ids[0] is NULL");
  p.prompt_ids[0] = ids;
  ids[5] = 1 << 30;
  expect("token id outside the vocabulary", mf_generate(ctx, &p, rgb, bytes), MF_ERROR_INVALID_ARGUMENT,
         "token id 1073741824");
  ids[5] = 0;
  int w = 0, h = 0;
  expect("output size", mf_output_size(ctx, &p, &w, &h), MF_OK, NULL);
  if (w != 256 || h != 256) {
    fprintf(stderr, "FAIL output size: %dx%d\n", w, h);
    ++failures;
  }
  expect("output size, null pointers", mf_output_size(ctx, &p, NULL, &h), MF_ERROR_INVALID_ARGUMENT, "NULL");
  uint64_t captures = 7, replays = 7;
  expect("graph counters, null ctx", mf_graph_counters(NULL, &captures, &replays), MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
  expect("graph counters, null pointer", mf_graph_counters(ctx, &captures, NULL), MF_ERROR_INVALID_ARGUMENT, "NULL");
  expect("graph counters", mf_graph_counters(ctx, &captures, &replays), MF_OK, NULL);
  if (captures != 0 || replays != 0) {  /* CPU: nothing captured */
    fprintf(stderr, "FAIL graph counters on the CPU: %llu captures, %llu replays\n", (unsigned long long)captures,
            (unsigned long long)replays);
    ++failures;
  }
  uint64_t hashed = 7, remembered = 7;
  expect("engine file counters, null pointer", mf_engine_file_counters(&hashed, NULL), MF_ERROR_INVALID_ARGUMENT,
         "NULL");
  expect("engine file counters", mf_engine_file_counters(&hashed, &remembered), MF_OK, NULL);
  /* mf_inputs: the setters refuse at once; what needs the plan or the folder is refused by mf_generate_with. */
  mf_inputs* in = NULL;
  expect("inputs, null out", mf_inputs_create(NULL), MF_ERROR_INVALID_ARGUMENT, "mf_inputs**");
  expect("inputs", mf_inputs_create(&in), MF_OK, NULL);
  uint8_t photo[8 * 8 * 3] = {0};
  expect("photo, null inputs", mf_inputs_set_init_image(NULL, photo, 8, 8, 0.5f, 0), MF_ERROR_INVALID_ARGUMENT,
         "inputs is NULL");
  expect("photo, null rgb", mf_inputs_set_init_image(in, NULL, 8, 8, 0.5f, 0), MF_ERROR_INVALID_ARGUMENT, "rgb is NULL");
  expect("photo, width 0", mf_inputs_set_init_image(in, photo, 0, 8, 0.5f, 0), MF_ERROR_INVALID_ARGUMENT, "size 0x8");
  expect("photo, strength 2", mf_inputs_set_init_image(in, photo, 8, 8, 2.0f, 0), MF_ERROR_INVALID_ARGUMENT,
         "strength 2: must be a number in (0, 1]");
  expect("control, null name", mf_inputs_add_control(in, NULL, photo, 8, 8, 1.0f, 0.0f, 1.0f),
         MF_ERROR_INVALID_ARGUMENT, "controlnet name is NULL");
  expect("control, start >= end", mf_inputs_add_control(in, "edges", photo, 8, 8, 1.0f, 0.6f, 0.2f),
         MF_ERROR_INVALID_ARGUMENT, "control start 0.6 / end 0.2");
  expect("progress, null inputs", mf_inputs_set_progress(NULL, NULL, NULL), MF_ERROR_INVALID_ARGUMENT,
         "inputs is NULL");
  expect("progress off", mf_inputs_set_progress(in, NULL, NULL), MF_OK, NULL);
  expect("photo, strength 0.1", mf_inputs_set_init_image(in, photo, 8, 8, 0.1f, 0), MF_OK, NULL);
  expect("photo runs no step", mf_generate_with(ctx, &p, in, rgb, bytes), MF_ERROR_INVALID_ARGUMENT,
         "strength 0.1: runs int(3 * 0.1) = 0 of the plan's 3 steps");
  expect("photo, start stage 3", mf_inputs_set_init_image(in, photo, 8, 8, 0.0f, 3), MF_OK, NULL);
  expect("start stage outside the plan", mf_generate_with(ctx, &p, in, rgb, bytes), MF_ERROR_INVALID_ARGUMENT,
         "start_stage 3: the plan has stages 1 to 2");
  mf_inputs_destroy(in);
  expect("inputs again", mf_inputs_create(&in), MF_OK, NULL);
  expect("control", mf_inputs_add_control(in, "no-such-controlnet", photo, 8, 8, 1.0f, 0.0f, 1.0f), MF_OK, NULL);
  expect("unknown controlnet", mf_generate_with(ctx, &p, in, rgb, bytes), MF_ERROR_ENGINE,
         "no ControlNet 'no-such-controlnet'");
  mf_inputs_destroy(in);
  expect("inputs for an IP-Adapter", mf_inputs_create(&in), MF_OK, NULL);
  const float embeds[4] = {0.5f, -1.0f, 0.25f, 2.0f};
  expect("ip embeds, null inputs", mf_inputs_set_ip_adapter_embeds(NULL, embeds, 4), MF_ERROR_INVALID_ARGUMENT,
         "inputs is NULL");
  expect("ip embeds, null values", mf_inputs_set_ip_adapter_embeds(in, NULL, 4), MF_ERROR_INVALID_ARGUMENT,
         "IP-Adapter embeds are NULL");
  expect("ip embeds", mf_inputs_set_ip_adapter_embeds(in, embeds, 4), MF_OK, NULL);
  expect("no unet_ip engines", mf_generate_with(ctx, &p, in, rgb, bytes), MF_ERROR_ENGINE,
         "no unet_ip (IP-Adapter) aoti engines");
  expect("ip image after embeds", mf_inputs_set_ip_adapter_image(in, photo, 8, 8), MF_ERROR_INVALID_ARGUMENT,
         "these inputs hold IP-Adapter embeds already");
  mf_inputs_destroy(in);
  expect("inputs for an IP-Adapter image", mf_inputs_create(&in), MF_OK, NULL);
  expect("ip image, null inputs", mf_inputs_set_ip_adapter_image(NULL, photo, 8, 8), MF_ERROR_INVALID_ARGUMENT,
         "inputs is NULL");
  expect("ip image, null pixels", mf_inputs_set_ip_adapter_image(in, NULL, 8, 8), MF_ERROR_INVALID_ARGUMENT,
         "IP-Adapter image: rgb is NULL");
  expect("ip image, width 0", mf_inputs_set_ip_adapter_image(in, photo, 0, 8), MF_ERROR_INVALID_ARGUMENT,
         "IP-Adapter image: size 0x8");
  expect("ip image", mf_inputs_set_ip_adapter_image(in, photo, 8, 8), MF_OK, NULL);
  expect("ip image, no unet_ip engines", mf_generate_with(ctx, &p, in, rgb, bytes), MF_ERROR_ENGINE,
         "no unet_ip (IP-Adapter) aoti engines");
  float out[4];
  expect("image embeds, null ctx", mf_ip_adapter_image_embeds(NULL, photo, 8, 8, out, 4), MF_ERROR_INVALID_ARGUMENT,
         "ctx is NULL");
  expect("image embeds, null out", mf_ip_adapter_image_embeds(ctx, photo, 8, 8, NULL, 4), MF_ERROR_INVALID_ARGUMENT,
         "embeds (the output) is NULL");
  expect("image embeds, null pixels", mf_ip_adapter_image_embeds(ctx, NULL, 8, 8, out, 4),
         MF_ERROR_INVALID_ARGUMENT, "IP-Adapter image: rgb is NULL");
  expect("image embeds, no unet_ip engines", mf_ip_adapter_image_embeds(ctx, photo, 8, 8, out, 4), MF_ERROR_ENGINE,
         "no unet_ip (IP-Adapter) aoti engines");
  mf_inputs_destroy(in);
  mf_inputs_destroy(NULL);
  expect("graphs off, null ctx", mf_set_cuda_graphs(NULL, 0), MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
  expect("graphs off", mf_set_cuda_graphs(ctx, 0), MF_OK, NULL);
  free(rgb);
  mf_context_destroy(ctx);
  mf_context_destroy(NULL);
  printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
