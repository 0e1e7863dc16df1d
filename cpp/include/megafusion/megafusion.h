/* libmegafusion: MegaFusion generation from built engines, for C and C++ callers, no Python interpreter.
 *
 * The engines are the AOTInductor packages `mf-build-engines --backend aoti` writes (engine folder with
 * manifest.json and models.json). Prompts come in as token ids, one array of MF_TOKEN_LENGTH ids per text
 * encoder (`mf-tokens` prints them). The stage plan, DDIM schedule, noise
 * re-scheduling, CFG, truncate-and-relay and noise draws are the Python runtime's: same engines, same ids and
 * same seed give the same image.
 *
 * Errors: every function returns an mf_status; on failure mf_last_error() returns a message naming the
 * problem (the thread's last failed call). Nothing throws or aborts across this boundary.
 * Threads: a context may be used by one thread at a time; distinct contexts are independent.
 */
#ifndef MEGAFUSION_MEGAFUSION_H_
#define MEGAFUSION_MEGAFUSION_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MF_TOKEN_LENGTH 77
#define MF_MAX_TEXT_ENCODERS 2

typedef enum mf_status {
  MF_OK = 0,
  MF_ERROR_INVALID_ARGUMENT = 1, /* a null pointer, an unknown name, a value out of its domain */
  MF_ERROR_UNSUPPORTED_SIZE = 2, /* a size or plan the model or the built engines do not serve */
  MF_ERROR_ENGINE = 3,           /* engine folder missing, manifest corrupt, engine missing, stale or corrupt */
  MF_ERROR_BUFFER_TOO_SMALL = 4, /* the caller's RGB buffer is smaller than width * height * 3 */
  MF_ERROR_RUNTIME = 5,          /* a failure while running the networks */
  MF_ERROR_CANCELLED = 6         /* the progress callback asked to stop (mf_inputs_set_progress) */
} mf_status;

typedef struct mf_context mf_context;

typedef struct mf_context_options {
  const char* engine_dir; /* required: the folder mf-build-engines --backend aoti wrote */
  const char* model;      /* required: model family the engines were built for ("sdxl", "sd15", "tiny-sd15", ...) */
  const char* device;     /* "cpu" (also when NULL), "cuda" or "cuda:N" */
  int verify_hashes;      /* ignored, kept for source and binary compatibility: every engine file's size and
                           * sha256 are always checked when it is loaded (a file unchanged since this process
                           * last hashed it is not read again); there is no way to skip the check */
} mf_context_options;

typedef struct mf_generate_params {
  /* prompt_ids[i]: MF_TOKEN_LENGTH ids for text encoder i (required for each of the model's encoders). */
  const int32_t* prompt_ids[MF_MAX_TEXT_ENCODERS];
  /* negative_ids[i]: the negative prompt's ids, or all NULL for an empty negative prompt. SDXL then uses zero
   * embeddings (force_zeros_for_empty_prompt); SD1.5 needs the empty prompt's ids, so NULL is refused there. */
  const int32_t* negative_ids[MF_MAX_TEXT_ENCODERS];
  int width;         /* output size; 0 and 0: the last stage's size, or the model's default plan */
  int height;
  const char* stages; /* NULL or "": the default plan for the size; else "WxH:steps,WxH:steps,..." */
  int total_steps;    /* default plan's total steps; 0: the model's default (50) */
  uint64_t seed;      /* seeds the one generator every noise tensor is drawn from */
  float guidance;     /* classifier-free guidance weight; CFG is off at <= 1 */
  int reschedule;     /* noise re-scheduling at stages after the first (nonzero: on) */
  int dilation;       /* mid-block dilation at stages after the first (1: off) */
  const char* relay;  /* "pixel" (default, also when NULL) or "latent" */
} mf_generate_params;

/* Fills the defaults: guidance 7, reschedule on, dilation 2, pixel relay, seed 0, default plan and size. */
void mf_generate_params_init(mf_generate_params* params);

/* Opens the engine folder: picks the model's AOTInductor entries for this device and torch version, checks
 * their files and loads them (the text encoders here; the UNet and VAE packages, of which a folder of
 * per-stage static packages holds one per stage shape, when a generation's plan first needs them, before any
 * of its work; a plan size no package covers is MF_ERROR_UNSUPPORTED_SIZE naming the sizes built). MF_ERROR_ENGINE, naming the file or entry, when manifest.json is not a valid
 * manifest (an entry's digest not the sha256 of its key, JSON nested deeper than 64 levels), or an engine
 * file lies outside the folder (absolute path, '..', a symbolic link), is not a regular file, or differs
 * from the size or sha256 its entry records. Entries built with --weights-apart get the tensors of their
 * weights.safetensors, read once per process and device per distinct file; MF_ERROR_ENGINE naming the file
 * when it is not a megafusion weight file or lacks a constant the package reads. On failure *out is set to NULL. */
mf_status mf_context_create(const mf_context_options* options, mf_context** out);

/* Frees the context and its engines; NULL is allowed. */
void mf_context_destroy(mf_context* ctx);

/* Number of text encoders of the context's model (1 for SD1.5, 2 for SDXL, 3 for SD3, 2 for FLUX); 0 for NULL. */
int mf_num_text_encoders(const mf_context* ctx);

/* The output size `params` asks for (after plan validation), without generating. */
mf_status mf_output_size(mf_context* ctx, const mf_generate_params* params, int* width, int* height);

/* Generates one image into `rgb` (height rows of width * 3 bytes, RGB8), `rgb_bytes` its capacity.
 * mf_generate_with(ctx, params, NULL, rgb, rgb_bytes). */
mf_status mf_generate(mf_context* ctx, const mf_generate_params* params, uint8_t* rgb, size_t rgb_bytes);

/* ---- Inputs beyond the params: a photo to start from (image to image) and ControlNets ----------------------
 * An mf_inputs holds what a generation takes besides mf_generate_params (kept apart so that struct keeps its
 * size: callers compiled against an older header still work). The setters check their values at once
 * (MF_ERROR_INVALID_ARGUMENT naming the value) and copy the pixels: the caller's buffers may go after the call.
 * What depends on the plan or the engine folder (a strength that runs no step or misses the start stage, a
 * ControlNet the folder holds no engines for, a stage size no package covers) is checked by mf_generate_with
 * before any network runs.
 *
 * LoRA: a folder built with `mf-build-engines --lora FILE` holds the UNet and text encoders with the LoRA fused
 * in; models.json records their fingerprints, so the context serves it like any folder. There is no LoRA swap
 * in the C API: another LoRA or scale is another engine folder. */
typedef struct mf_inputs mf_inputs;

/* A new, empty inputs object (no photo, no ControlNet). On failure *out is NULL. */
mf_status mf_inputs_create(mf_inputs** out);

/* Frees it; NULL is allowed. */
void mf_inputs_destroy(mf_inputs* inputs);

/* Image to image (docs/ALGORITHM.md §14): `rgb` holds height rows of width * 3 bytes (RGB8), any size; it is
 * resized to the entry stage's size as the pixel relay resizes, VAE-encoded, and noised to the first step
 * that runs. With N the plan's steps, `strength` runs min(int(N * strength), N) of them (diffusers' img2img).
 * start_stage 0: the stage that step falls in; start_stage k >= 1 (1-based): the photo enters stage k, and
 * strength must start there, or be 0 for stage k's first step. Replaces an earlier photo. */
mf_status mf_inputs_set_init_image(mf_inputs* inputs, const uint8_t* rgb, int width, int height, float strength,
                                   int start_stage);

/* A ControlNet (docs/ALGORITHM.md §16) with its control image (RGB8 rows, any size: resized to each stage's
 * size), conditioning `scale` (finite) and the fraction [start, end) of the global schedule where it acts
 * (0 <= start < end <= 1). `controlnet` names ControlNet engines in the folder: the name of the folder
 * `mf-build-engines --controlnet DIR` was given (DIR's last component, as models.json records it), or the
 * weights fingerprint of its entries in manifest.json ("mf2:files:<sha256>" whole, over the ControlNet folder's
 * files, or a unique prefix of 12 or more of its sha256's hex digits).
 * Several calls add several ControlNets, whose residuals add up (diffusers' MultiControlNetModel).
 * SD3 / FLUX contexts take SD3ControlNetModel / FluxControlNetModel packages (`mf-build-engines --model sd3|flux
 * --backend aoti --controlnet DIR`): the control image is resized to each stage's size and VAE-encoded there (the
 * folder needs a vae_encoder package at every stage size that runs); not yet FLUX nets with a pixel hint block
 * (XLabs' kind), refused naming the net (docs/ALGORITHM.md §21). */
mf_status mf_inputs_add_control(mf_inputs* inputs, const char* controlnet, const uint8_t* rgb, int width, int height,
                                float scale, float start, float end);

/* IP-Adapter (SD1.5 / SDXL): `embeds` holds the reference image's image embeddings, n floats: the CLIP vision
 * encoder's `image_embeds` (CLIPVisionModelWithProjection; runtime/ipadapter.py encode_ip_image computes them), which
 * the caller computes (or libmegafusion from the image: mf_inputs_set_ip_adapter_image below). A generation with
 * them runs the folder's `unet_ip` packages (`mf-build-engines --backend aoti --ip-adapter FILE --ip-adapter-scale
 * S`; the scale is built in) in the UNet's place, standard or dilated per stage as the UNet, with [zeros, embeds] on
 * the CFG batch, inside the same step graphs (the adapter is part of a graph's descriptor). mf_generate_with
 * refuses, before any network runs: a
 * folder without unet_ip packages for its UNet or the plan's stage sizes (MF_ERROR_ENGINE / MF_ERROR_UNSUPPORTED_SIZE,
 * naming the mf-build-engines command), a folder holding several IP-Adapters or scales (MF_ERROR_ENGINE: one per
 * folder), n other than the packages' embedding length (MF_ERROR_INVALID_ARGUMENT naming both), and ControlNets
 * with it (no unet_ip package takes their residuals). Values are copied; a non-finite one is refused here.
 * Replaces earlier embeds. */
mf_status mf_inputs_set_ip_adapter_embeds(mf_inputs* inputs, const float* embeds, size_t n);

/* IP-Adapter from the reference image itself: `rgb` holds height rows of width * 3 bytes (RGB8), any size. The
 * folder's image encoder package (`mf-build-engines --backend aoti --ip-adapter FILE --ip-adapter-encoder DIR`, the
 * CLIP vision model DIR built beside the unet_ip packages) turns it into the embeddings once per generation, then
 * the generation runs as with mf_inputs_set_ip_adapter_embeds. The image is first made into the encoder's
 * pixel_values as its CLIPImageProcessor does (the steps models.json records: shortest side resized to the crop size,
 * bicubic, on the 8-bit image; center crop; scaled to [0, 1]; normalized with the processor's mean and std), within
 * 2 levels of 255 of transformers' pixels (PIL's bicubic against torch's antialiased one). mf_generate_with refuses,
 * before any network runs, besides the embeds' refusals: a folder without an image_encoder package whose
 * embeddings have the unet_ip packages' length (MF_ERROR_ENGINE naming the mf-build-engines command), or with
 * several (MF_ERROR_ENGINE naming their folders: one per folder), or one built by another torch or for another
 * device (MF_ERROR_ENGINE), and an image smaller than the encoder's crop after its resize (MF_ERROR_INVALID_ARGUMENT).
 * Here: NULL, a side < 1 or more than 2^28 pixels (MF_ERROR_INVALID_ARGUMENT). An image and embeds are one or the
 * other: setting either while the other is set is MF_ERROR_INVALID_ARGUMENT and changes nothing (use another
 * mf_inputs). The pixels are copied; an image replaces an earlier image. */
mf_status mf_inputs_set_ip_adapter_image(mf_inputs* inputs, const uint8_t* rgb, int width, int height);

/* The embeddings mf_inputs_set_ip_adapter_image's path computes for an image, into `embeds` (n floats: the unet_ip
 * packages' length, else MF_ERROR_INVALID_ARGUMENT naming it), with the same refusals: for a server that keeps them
 * per reference image and passes them with mf_inputs_set_ip_adapter_embeds. */
mf_status mf_ip_adapter_image_embeds(mf_context* ctx, const uint8_t* rgb, int width, int height, float* embeds,
                                     size_t n);

/* ---- SD3 and FLUX (docs/ALGORITHM.md §18): token ids per encoder --------------------------------------------
 * A context opened with model "sd3", "flux", "tiny-sd3" or "tiny-flux" runs the flow-matching stage loop on the
 * folder `mf-build-engines --model M --backend aoti` wrote (transformer, text encoder and VAE packages). Its prompt
 * comes as token ids per encoder set on an mf_inputs (mf_generate_params.prompt_ids/negative_ids are refused):
 * `encoder` is "clip_l", "clip_g" (SD3 only) or "t5"; CLIP takes MF_TOKEN_LENGTH ids, T5 the model's T5 length
 * (SD3 256, FLUX 512), each padded as the Python tokenizers pad (the Python side tokenizes). SD3 with guidance > 1
 * runs CFG and needs the negative prompt's ids for every encoder (the empty prompt's ids for none); FLUX is
 * guidance-distilled: `guidance` feeds its guidance embedding and it takes no negative prompt. Dilation does not
 * apply (a transformer has no convolution to dilate). Image to image (mf_inputs_set_init_image) runs as
 * diffusers' flow img2img pipelines enter their schedule (docs/ALGORITHM.md §18.1, runtime/flow_img2img.py): the
 * first int(max(N - min(N * strength, N), 0)) of the plan's N steps are skipped (not the UNet rule above), the
 * photo is resized to the entry stage's size as the pixel relay resizes, encoded with the folder's VAE encoder
 * package ((mean - shift) * scaling) and noised z = (1 - sigma) x0 + sigma noise to the first kept sigma; a
 * strength outside start_stage names that stage's range. The entry stage needs a vae_encoder package of its size
 * (MF_ERROR_UNSUPPORTED_SIZE otherwise; `mf-build-engines` builds them only for the stages after the first).
 * ControlNets: mf_inputs_add_control above. The whole Euler step runs in CUDA graphs as the UNet's step does
 * (mf_set_cuda_graphs).
 * The lengths are checked by mf_generate_with (MF_ERROR_INVALID_ARGUMENT naming the encoder). */
mf_status mf_inputs_set_tokens(mf_inputs* inputs, const char* encoder, const int32_t* ids, size_t n);

/* The negative prompt's ids for `encoder` (SD3 with CFG). */
mf_status mf_inputs_set_negative_tokens(mf_inputs* inputs, const char* encoder, const int32_t* ids, size_t n);

/* Progress and cancellation, for a server that reports a request's progress or ends it at its deadline or when
 * its client goes: `fn(user, step, total)` is called on the generating thread after each denoise step that runs,
 * with the steps done so far (1 to total) and the plan's steps that run (fewer with a photo that enters late).
 * On CUDA it is called once the step has run on the device (the library waits for it: with a callback set, no
 * more than one step is queued ahead). A nonzero return ends the generation there: mf_generate_with returns
 * MF_ERROR_CANCELLED ("cancelled by the progress callback after step S of T") and leaves `rgb` untouched; the
 * context serves the next generation as usual. The relays and the decode between and after the steps are not
 * steps: a stop asked for in the last step's call skips the decode. fn NULL: no callback (the default). */
typedef int (*mf_progress_fn)(void* user, int step, int total);
mf_status mf_inputs_set_progress(mf_inputs* inputs, mf_progress_fn fn, void* user);

/* mf_generate with inputs (NULL: none, the same as mf_generate). A ControlNet the folder holds no engines
 * for is MF_ERROR_ENGINE, a stage size its packages do not cover MF_ERROR_UNSUPPORTED_SIZE, both naming the
 * mf-build-engines command that builds them. */
mf_status mf_generate_with(mf_context* ctx, const mf_generate_params* params, const mf_inputs* inputs, uint8_t* rgb,
                           size_t rgb_bytes);

/* CUDA graphs of the denoise step: nonzero (the default) captures each stage's whole step (UNet on the CFG
 * batch, guidance, x0, DDIM update) once per stage descriptor (latent size, dilation, CFG on or off, UNet
 * dtype, which ControlNets run: their scales, schedule windows and images are buffers the graph reads, refilled
 * for each generation; which IP-Adapter runs: its embeddings are such a buffer too) and replays it for every
 * step; 0 runs the steps one by one, as before. On the CPU, or in a library
 * built without CUDA, "on" runs the same buffered step without capturing (the counters stay 0). SD3 and FLUX
 * contexts capture their whole Euler step alike, per batch, latent size, CFG and ControlNets. */
mf_status mf_set_cuda_graphs(mf_context* ctx, int enabled);

/* How many step graphs the context has captured and how many times it has replayed one, since it was
 * created (a generation of N steps replays N times; captures grow only with new descriptors). */
mf_status mf_graph_counters(const mf_context* ctx, uint64_t* captures, uint64_t* replays);

/* Engine files this process has verified against their manifest sha256 since it started, all contexts
 * together: `hashed` read whole, `remembered` answered by the record kept in the folder's file-hashes.json (the
 * file's size, times, inode and device unchanged since it was hashed; mf-build-engines writes them, and so does
 * the library for a file it hashed where the folder can be written), so a start from a built folder reads none
 * of its gigabytes. */
mf_status mf_engine_file_counters(uint64_t* hashed, uint64_t* remembered);

/* The message of this thread's last failed call ("" if none); valid until the thread's next call. */
const char* mf_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* MEGAFUSION_MEGAFUSION_H_ */
