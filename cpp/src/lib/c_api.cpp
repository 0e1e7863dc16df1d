// The C boundary: every call catches everything, keeps the message per thread and returns a status code.
#include <exception>
#include <string>

#include <memory>

#include "context.hpp"
#include "flow_context.hpp"
#include "megafusion/flow_schedule.hpp"
#include "megafusion/megafusion.h"

// A UNet family's context, or an SD3 / FLUX one (flow_context.hpp): the model name picks.
struct mf_context {
  std::unique_ptr<megafusion::lib::Context> unet;
  std::unique_ptr<megafusion::lib::FlowContext> flow;
  explicit mf_context(const mf_context_options& o) {
    if (o.model && megafusion::find_flow_family(o.model))
      flow = std::make_unique<megafusion::lib::FlowContext>(o);
    else
      unet = std::make_unique<megafusion::lib::Context>(o);
  }
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

int mf_num_text_encoders(const mf_context* ctx) {
  return !ctx ? 0 : ctx->flow ? ctx->flow->num_text_encoders() : ctx->unet->num_text_encoders();
}

mf_status mf_output_size(mf_context* ctx, const mf_generate_params* params, int* width, int* height) {
  return guarded([&] {
    if (!ctx) throw Failure(MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
    if (!params) throw Failure(MF_ERROR_INVALID_ARGUMENT, "params is NULL");
    if (!width || !height) throw Failure(MF_ERROR_INVALID_ARGUMENT, "width or height pointer is NULL");
    const auto plan = ctx->flow ? ctx->flow->plan_of(*params) : ctx->unet->plan_of(*params);
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
    if (ctx->flow)
      ctx->flow->generate(*params, inputs ? &inputs->impl : nullptr, rgb, rgb_bytes);
    else
      ctx->unet->generate(*params, inputs ? &inputs->impl : nullptr, rgb, rgb_bytes);
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

mf_status mf_inputs_set_ip_adapter_embeds(mf_inputs* inputs, const float* embeds, size_t n) {
  return guarded([&] {
    if (!inputs) throw Failure(MF_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    inputs->impl.set_ip_embeds(embeds, n);
  });
}

mf_status mf_inputs_set_ip_adapter_image(mf_inputs* inputs, const uint8_t* rgb, int width, int height) {
  return guarded([&] {
    if (!inputs) throw Failure(MF_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    inputs->impl.set_ip_image(rgb, width, height);
  });
}

mf_status mf_ip_adapter_image_embeds(mf_context* ctx, const uint8_t* rgb, int width, int height, float* embeds,
                                     size_t n) {
  return guarded([&] {
    if (!ctx) throw Failure(MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
    if (!embeds) throw Failure(MF_ERROR_INVALID_ARGUMENT, "embeds (the output) is NULL");
    if (ctx->flow)
      throw Failure(MF_ERROR_INVALID_ARGUMENT, "SD3 and FLUX contexts have no IP-Adapter image encoder in the C API");
    megafusion::lib::Inputs in;  // the same checks of the pixels as mf_inputs_set_ip_adapter_image
    in.set_ip_image(rgb, width, height);
    ctx->unet->ip_image_embeds(*in.ip_image, embeds, n);
  });
}

mf_status mf_inputs_set_tokens(mf_inputs* inputs, const char* encoder, const int32_t* ids, size_t n) {
  return guarded([&] {
    if (!inputs) throw Failure(MF_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    inputs->impl.set_tokens(encoder, ids, n, false);
  });
}

mf_status mf_inputs_set_negative_tokens(mf_inputs* inputs, const char* encoder, const int32_t* ids, size_t n) {
  return guarded([&] {
    if (!inputs) throw Failure(MF_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    inputs->impl.set_tokens(encoder, ids, n, true);
  });
}

mf_status mf_inputs_set_progress(mf_inputs* inputs, mf_progress_fn fn, void* user) {
  return guarded([&] {
    if (!inputs) throw Failure(MF_ERROR_INVALID_ARGUMENT, "inputs is NULL");
    inputs->impl.progress = fn;
    inputs->impl.progress_user = fn ? user : nullptr;
  });
}

mf_status mf_set_cuda_graphs(mf_context* ctx, int enabled) {
  return guarded([&] {
    if (!ctx) throw Failure(MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
    if (ctx->unet) ctx->unet->set_graphs(enabled != 0);
    if (ctx->flow) ctx->flow->set_graphs(enabled != 0);
  });
}

mf_status mf_graph_counters(const mf_context* ctx, uint64_t* captures, uint64_t* replays) {
  return guarded([&] {
    if (!ctx) throw Failure(MF_ERROR_INVALID_ARGUMENT, "ctx is NULL");
    if (!captures || !replays) throw Failure(MF_ERROR_INVALID_ARGUMENT, "captures or replays pointer is NULL");
    *captures = ctx->unet ? ctx->unet->graph_captures() : ctx->flow->graph_captures();
    *replays = ctx->unet ? ctx->unet->graph_replays() : ctx->flow->graph_replays();
  });
}

mf_status mf_engine_file_counters(uint64_t* hashed, uint64_t* remembered) {
  return guarded([&] {
    if (!hashed || !remembered) throw Failure(MF_ERROR_INVALID_ARGUMENT, "hashed or remembered pointer is NULL");
    *hashed = megafusion::lib::files_hashed();
    *remembered = megafusion::lib::files_remembered();
  });
}

const char* mf_last_error(void) { return g_last_error.c_str(); }

}  // extern "C"
