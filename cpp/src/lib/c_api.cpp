// The C boundary: every call catches everything, keeps the message per thread and returns a status code.
#include <exception>
#include <string>

#include "context.hpp"
#include "megafusion/megafusion.h"

struct mf_context {
  megafusion::lib::Context impl;
  explicit mf_context(const mf_context_options& o) : impl(o) {}
};

struct mf_inputs {
  megafusion::lib::Inputs impl;
};

namespace {

thread_local std::string g_last_error;

template <typename F>
mf_status guarded(F&& body) {
  try {
    body();
    g_last_error.clear();
    return MF_OK;
  } catch (const megafusion::lib::Failure& e) {
    g_last_error = e.what();
    return e.code;
  } catch (const std::bad_alloc&) {
    g_last_error = "out of memory";
    return MF_ERROR_RUNTIME;
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return MF_ERROR_RUNTIME;
  } catch (...) {
    g_last_error = "unknown error";
    return MF_ERROR_RUNTIME;
  }
}

using megafusion::lib::Failure;

}  // namespace

extern "C" {

void mf_generate_params_init(mf_generate_params* p) {
  if (!p) return;
  *p = mf_generate_params{};
  p->guidance = 7.0f;
  p->reschedule = 1;
  p->dilation = 2;
  p->relay = "pixel";
}

mf_status mf_context_create(const mf_context_options* options, mf_context** out) {
  return guarded([&] {
    if (!out) throw Failure(MF_ERROR_INVALID_ARGUMENT, "out (mf_context**) is NULL");
    *out = nullptr;
    if (!options) throw Failure(MF_ERROR_INVALID_ARGUMENT, "options is NULL");
    *out = new mf_context(*options);
  });
}

void mf_context_destroy(mf_context* ctx) {
  try {
    delete ctx;
  } catch (...) {  // destructors of loaded packages must not take the caller down
  }
}

int mf_num_text_encoders(const mf_context* ctx) { return ctx ? ctx->impl.num_text_encoders() : 0; }

mf_status mf_output_size(mf_context* ctx, const mf_generate_params* params, int* width, int* height) {
  return guarded([&] {
    if (!ctx) throw Failure(MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
    if (!params) throw Failure(MF_ERROR_INVALID_ARGUMENT, "params is NULL");
    if (!width || !height) throw Failure(MF_ERROR_INVALID_ARGUMENT, "width or height pointer is NULL");
    const auto plan = ctx->impl.plan_of(*params);
    *width = plan.output_width;
    *height = plan.output_height;
  });
}

mf_status mf_generate(mf_context* ctx, const mf_generate_params* params, uint8_t* rgb, size_t rgb_bytes) {
  return mf_generate_with(ctx, params, nullptr, rgb, rgb_bytes);
}

mf_status mf_generate_with(mf_context* ctx, const mf_generate_params* params, const mf_inputs* inputs, uint8_t* rgb,
                           size_t rgb_bytes) {
  return guarded([&] {
    if (!ctx) throw Failure(MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
    if (!params) throw Failure(MF_ERROR_INVALID_ARGUMENT, "params is NULL");
    ctx->impl.generate(*params, inputs ? &inputs->impl : nullptr, rgb, rgb_bytes);
  });
}

mf_status mf_inputs_create(mf_inputs** out) {
  return guarded([&] {
    if (!out) throw Failure(MF_ERROR_INVALID_ARGUMENT, "out (mf_inputs**) is NULL");
    *out = nullptr;
    *out = new mf_inputs();
  });
}

void mf_inputs_destroy(mf_inputs* inputs) { delete inputs; }

mf_status mf_inputs_set_init_image(mf_inputs* inputs, const uint8_t* rgb, int width, int height, float strength,
                                   int start_stage) {
  return guarded([&] {
    if (!inputs) throw Failure(MF_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    inputs->impl.set_init_image(rgb, width, height, strength, start_stage);
  });
}

mf_status mf_inputs_add_control(mf_inputs* inputs, const char* controlnet, const uint8_t* rgb, int width, int height,
                                float scale, float start, float end) {
  return guarded([&] {
    if (!inputs) throw Failure(MF_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    inputs->impl.add_control(controlnet, rgb, width, height, scale, start, end);
  });
}

mf_status mf_set_cuda_graphs(mf_context* ctx, int enabled) {
  return guarded([&] {
    if (!ctx) throw Failure(MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
    ctx->impl.set_graphs(enabled != 0);
  });
}

mf_status mf_graph_counters(const mf_context* ctx, uint64_t* captures, uint64_t* replays) {
  return guarded([&] {
    if (!ctx) throw Failure(MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
    if (!captures || !replays) throw Failure(MF_ERROR_INVALID_ARGUMENT, "captures or replays pointer is NULL");
    *captures = ctx->impl.graph_captures();
    *replays = ctx->impl.graph_replays();
  });
}

const char* mf_last_error(void) { return g_last_error.c_str(); }

}  // extern "C"
