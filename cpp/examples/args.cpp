#include "args.hpp"

#include <charconv>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <tuple>
#include <fstream>
#include <system_error>

namespace mfcli {

const char* const kUsage =
    "usage: mf-generate-cpp --engines DIR --model NAME --ids FILE --output PNG [--size WxH] [--stages S]\n"
    "                       [--steps N] [--seed N] [--guidance W] [--no-reschedule] [--dilation D]\n"
    "                       [--relay pixel|latent] [--device cpu|cuda[:N]] [--repeats N] [--no-graphs]\n"
    "                       [--progress] [--deadline SECONDS]\n"
    "                       [--image PPM [--strength S] [--start-stage K]]\n"
    "                       [--controlnet NAME --control-image PPM ... [--control-scale F] [--control-start F]\n"
    "                        [--control-end F]] [--ip-adapter-embeds FILE | --ip-adapter-image PPM]\n"
    "--image: start from this photo (binary PPM, P6); --strength: fraction of the steps that run (default 0.8)\n"
    "--controlnet: a ControlNet whose engines the folder holds, by its folder's name or weights fingerprint\n"
    "--ip-adapter-embeds: the IP-Adapter image's CLIP image_embeds, float32 little-endian (raw or .npy), run\n"
    "  with the folder's unet_ip engines (mf-build-engines --ip-adapter FILE)\n"
    "--ip-adapter-image: the IP-Adapter image itself (binary PPM), encoded by the folder's image encoder package\n"
    "  (mf-build-engines --ip-adapter FILE --ip-adapter-encoder DIR)\n"
    "--no-graphs: run the denoise steps one by one instead of replaying one CUDA graph per stage descriptor\n"
    "--progress: print 'step S/T' to stderr after each denoise step (mf_inputs_set_progress)\n"
    "--deadline: stop a generation still running SECONDS after it began, at the next step (exit status 6,\n"
    "  MF_ERROR_CANCELLED): how a server ends a request at its deadline\n"
    "engine files are always checked against their sha256 (--verify-hashes is accepted and does nothing)\n";

namespace {

std::string quoted(const std::string& text) { return "'" + text + "'"; }

bool all_digits(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

// Decimal digits only, into `out` if <= max; false on anything else (sign, junk, overflow).
bool digits_at_most(const std::string& s, uint64_t max, uint64_t& out) {
  if (!all_digits(s)) return false;
  uint64_t v = 0;
  for (char c : s) {
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (d > max || v > (max - d) / 10) return false;
    v = v * 10 + d;
  }
  out = v;
  return true;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

std::vector<std::string> split_ws(const std::string& line) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && is_space(line[i])) ++i;
    const size_t start = i;
    while (i < line.size() && !is_space(line[i])) ++i;
    if (i > start) out.push_back(line.substr(start, i - start));
  }
  return out;
}

}  // namespace

bool parse_u64(const std::string& flag, const std::string& text, uint64_t& out, std::string& error) {
  if (digits_at_most(text, UINT64_MAX, out)) return true;
  const std::string name = flag.substr(flag.find_first_not_of('-'));
  error = flag + " " + quoted(text) + ": must be an integer 0 <= " + name + " < 2^64";
  return false;
}

bool parse_int_at_least(const std::string& flag, const std::string& text, int lo, int& out, std::string& error) {
  const bool negative = !text.empty() && text[0] == '-';
  const std::string body = negative ? text.substr(1) : text;
  if (!all_digits(body)) {
    error = flag + " " + quoted(text) + ": not an integer";
    return false;
  }
  uint64_t v = 0;
  if (negative || !digits_at_most(body, INT_MAX, v) || v < static_cast<uint64_t>(lo)) {
    error = flag + " " + quoted(text) + ": must be an integer from " + std::to_string(lo) + " to " +
            std::to_string(INT_MAX);
    return false;
  }
  out = static_cast<int>(v);
  return true;
}

bool parse_guidance(const std::string& flag, const std::string& text, float& out, std::string& error) {
  const std::string t = !text.empty() && text[0] == '+' ? text.substr(1) : text;
  double d = 0;
  const auto r = t.empty() ? std::from_chars_result{t.data(), std::errc::invalid_argument}
                           : std::from_chars(t.data(), t.data() + t.size(), d);
  const float f = static_cast<float>(d);
  if (r.ec != std::errc() || r.ptr != t.data() + t.size() || !std::isfinite(d) || !std::isfinite(f) || d < 0) {
    error = flag + " " + quoted(text) + ": must be a finite number >= 0";
    return false;
  }
  out = f;
  return true;
}

// As core/plan.py parse_size: ^\s*(\d+)\s*[xX]\s*(\d+)\s*$, each side 1 to MAX_SIDE.
bool parse_size(const std::string& flag, const std::string& text, int& width, int& height, std::string& error) {
  size_t i = 0;
  auto skip = [&] {
    while (i < text.size() && is_space(text[i])) ++i;
  };
  auto number = [&](std::string& digits) {
    const size_t start = i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') ++i;
    digits = text.substr(start, i - start);
    return !digits.empty();
  };
  std::string w, h;
  skip();
  bool ok = number(w);
  skip();
  ok = ok && i < text.size() && (text[i] == 'x' || text[i] == 'X');
  ++i;
  skip();
  ok = ok && number(h);
  skip();
  if (!ok || i != text.size()) {
    error = flag + " " + quoted(text) + ": expected WIDTHxHEIGHT, e.g. 1920x1080";
    return false;
  }
  uint64_t wv = 0, hv = 0;
  if (!digits_at_most(w, kMaxSide, wv) || !digits_at_most(h, kMaxSide, hv) || wv < 1 || hv < 1) {
    error = flag + " " + quoted(text) + ": each side must be between 1 and " + std::to_string(kMaxSide) + " pixels";
    return false;
  }
  width = static_cast<int>(wv);
  height = static_cast<int>(hv);
  return true;
}

bool read_ids(const std::string& flag, const std::string& path, std::vector<std::vector<int32_t>>& prompt,
              std::vector<std::vector<int32_t>>& negative, std::string& error) {
  const std::string file = flag + " " + quoted(path);
  std::ifstream f(path);
  if (!f) return error = file + ": cannot read the token file", false;
  std::vector<std::vector<bool>> seen(2, std::vector<bool>(MF_MAX_TEXT_ENCODERS, false));
  std::string line;
  for (int number = 1; std::getline(f, line); ++number) {
    const std::vector<std::string> words = split_ws(line);
    if (words.empty() || words[0][0] == '#') continue;
    const std::string at = file + " line " + std::to_string(number);
    if ((words[0] != "prompt" && words[0] != "negative") || words.size() < 2)
      return error = at + ": expected 'prompt I id...' or 'negative I id...', got " + quoted(line.substr(0, 60)),
             false;
    uint64_t index = 0;
    if (!digits_at_most(words[1], MF_MAX_TEXT_ENCODERS - 1, index))
      return error = at + ": text encoder index " + quoted(words[1]) + " must be 0 to " +
                     std::to_string(MF_MAX_TEXT_ENCODERS - 1),
             false;
    const bool is_prompt = words[0] == "prompt";
    if (seen[is_prompt][index])
      return error = at + ": a second '" + words[0] + " " + words[1] + "' line", false;
    seen[is_prompt][index] = true;
    auto& dst = is_prompt ? prompt : negative;
    if (dst.size() <= index) dst.resize(index + 1);
    for (size_t k = 2; k < words.size(); ++k) {
      uint64_t id = 0;
      if (!digits_at_most(words[k], INT32_MAX, id))
        return error = at + ": token id " + quoted(words[k]) + " is not an integer 0 <= id < 2^31", false;
      dst[index].push_back(static_cast<int32_t>(id));
    }
    if (dst[index].size() != MF_TOKEN_LENGTH)
      return error = at + ": " + words[0] + " " + words[1] + " has " + std::to_string(dst[index].size()) +
                     " ids, expected " + std::to_string(MF_TOKEN_LENGTH),
             false;
  }
  if (f.bad()) return error = file + ": cannot read the token file", false;
  if (prompt.empty()) return error = file + ": no prompt ids", false;
  for (int kind = 0; kind < 2; ++kind) {
    const auto& v = kind ? prompt : negative;
    for (size_t i = 0; i < v.size(); ++i)
      if (!seen[kind][i])
        return error = file + ": no '" + (kind ? "prompt " : "negative ") + std::to_string(i) + "' line", false;
  }
  return true;
}

bool parse_float(const std::string& flag, const std::string& text, float& out, std::string& error) {
  const char* begin = text.c_str();
  char* end = nullptr;
  const float v = std::strtof(begin, &end);
  if (text.empty() || end != begin + text.size() || !std::isfinite(v))
    return error = flag + " " + quoted(text) + ": expected a finite number", false;
  out = v;
  return true;
}

int parse_command_line(int argc, const char* const* argv, CommandLine& cl, mf_generate_params& params,
                       std::string& error) {
  bool steps_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--no-reschedule") { params.reschedule = 0; continue; }
    if (a == "--no-graphs") { cl.graphs = false; continue; }
    if (a == "--progress") { cl.progress = true; continue; }
    if (a == "--verify-hashes") continue;  // always checked now; accepted for old command lines
    if (a == "-h" || a == "--help") { cl.help = true; return 0; }
    static const char* const valued[] = {"--engines", "--model", "--ids", "--output", "--size", "--stages",
                                         "--relay", "--device", "--steps", "--seed", "--guidance", "--dilation",
                                         "--repeats", "--image", "--strength", "--start-stage", "--controlnet",
                                         "--control-image", "--control-scale", "--control-start", "--control-end",
                                         "--ip-adapter-embeds", "--ip-adapter-image", "--deadline"};
    bool known = false;
    for (const char* v : valued) known = known || a == v;
    if (!known) return error = "unknown argument " + quoted(a) + " (see --help)", kUsageError;
    if (i + 1 >= argc) return error = a + " needs a value", kUsageError;
    const std::string v = argv[++i];
    bool ok = true;
    if (a == "--engines") cl.engines = v;
    else if (a == "--model") cl.model = v;
    else if (a == "--ids") cl.ids = v;
    else if (a == "--output") cl.output = v;
    else if (a == "--stages") cl.stages = v;
    else if (a == "--relay") cl.relay = v;
    else if (a == "--device") cl.device = v;
    else if (a == "--size") ok = parse_size(a, v, params.width, params.height, error);
    else if (a == "--steps") ok = steps_given = parse_int_at_least(a, v, 1, params.total_steps, error);
    else if (a == "--seed") ok = parse_u64(a, v, params.seed, error);
    else if (a == "--guidance") ok = parse_guidance(a, v, params.guidance, error);
    else if (a == "--dilation") {
      ok = parse_int_at_least(a, v, 1, params.dilation, error);
      if (ok && params.dilation > kMaxDilation)  // the rule and message of Python's cli/common.py
        ok = false, error = "--dilation " + v + ": must be at most " + std::to_string(kMaxDilation) +
                            " (the paper uses 2; past " + std::to_string(kMaxDilation) +
                            " a 3x3 kernel's taps lie farther apart than SD1.5's 8x8 native mid-block map)";
    }
    else if (a == "--repeats") ok = parse_int_at_least(a, v, 1, cl.repeats, error);
    else if (a == "--image") cl.image = v;
    else if (a == "--strength") {
      ok = parse_float(a, v, cl.strength, error);
      if (ok && !(cl.strength > 0 && cl.strength <= 1)) ok = false, error = a + " " + v + ": must be a number in (0, 1]";
    }
    else if (a == "--start-stage") ok = parse_int_at_least(a, v, 1, cl.start_stage, error);
    else if (a == "--controlnet") cl.controlnets.push_back(v);
    else if (a == "--control-image") cl.control_images.push_back(v);
    else if (a == "--ip-adapter-embeds") cl.ip_embeds = v;
    else if (a == "--ip-adapter-image") cl.ip_image = v;
    else if (a == "--deadline") {
      ok = parse_float(a, v, cl.deadline_s, error);
      if (ok && !(cl.deadline_s >= 0)) ok = false, error = a + " " + v + ": must be a number of seconds >= 0";
    }
    else {  // --control-scale, --control-start, --control-end
      float f = 0;
      ok = parse_float(a, v, f, error);
      (a == "--control-scale" ? cl.control_scales : a == "--control-start" ? cl.control_starts : cl.control_ends)
          .push_back(f);
    }
    if (!ok) return kUsageError;
  }
  if (cl.engines.empty() || cl.model.empty() || cl.ids.empty() || cl.output.empty())
    return error = "--engines, --model, --ids and --output are required (see --help)", kUsageError;
  if (steps_given && !cl.stages.empty())
    return error = "--steps and --stages exclude each other (give steps per stage in --stages)", kUsageError;
  if (cl.image.empty() && (cl.strength != 0 || cl.start_stage != 0))
    return error = "--strength and --start-stage need --image", kUsageError;
  if (!cl.image.empty() && cl.strength == 0 && cl.start_stage == 0) cl.strength = 0.8f;  // diffusers' default
  const size_t n = cl.controlnets.size();
  if (cl.control_images.size() != n)
    return error = "give one --control-image per --controlnet (" + std::to_string(n) + " --controlnet, " +
                   std::to_string(cl.control_images.size()) + " --control-image)",
           kUsageError;
  for (auto [flag, v, fallback] : {std::make_tuple("--control-scale", &cl.control_scales, 1.0f),
                                   std::make_tuple("--control-start", &cl.control_starts, 0.0f),
                                   std::make_tuple("--control-end", &cl.control_ends, 1.0f)}) {
    if (n == 0 && !v->empty()) return error = std::string(flag) + " needs --controlnet", kUsageError;
    if (v->size() > 1 && v->size() != n)
      return error = std::string(flag) + " given " + std::to_string(v->size()) + " times for " + std::to_string(n) +
                     " --controlnet; give it once or once per ControlNet",
             kUsageError;
    v->resize(n, v->empty() ? fallback : v->front());
  }
  for (const auto& [flag, v] : {std::make_pair("--ip-adapter-embeds", &cl.ip_embeds),
                                std::make_pair("--ip-adapter-image", &cl.ip_image)})
    if (!v->empty() && n != 0)  // as mf-generate --engines: no unet_ip engine takes ControlNet residuals
      return error = std::string(flag) + " with --controlnet: the IP-Adapter engines take no ControlNet; give one "
                     "or the other",
             kUsageError;
  if (!cl.ip_embeds.empty() && !cl.ip_image.empty())
    return error = "--ip-adapter-image and --ip-adapter-embeds exclude each other (the image gives the embeddings)",
           kUsageError;
  if (!read_ids("--ids", cl.ids, cl.prompt, cl.negative, error)) return kUsageError;
  return 0;
}

}  // namespace mfcli
