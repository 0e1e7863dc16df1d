// mf-generate-cpp's command line (examples/args.cpp) without libtorch: every bad value is refused with one
// line naming the flag and the value and status 2 (never a silent 0, default or wrapped id); good ones parse.
// Usage: cli_args SCRATCH_DIR
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "args.hpp"
#include "embeds.hpp"

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << "\n";
  g_failures += !ok;
}

std::string g_ids;  // a valid token file

// mf_generate_params_init's values (the test does not link libmegafusion).
mf_generate_params defaults() {
  mf_generate_params p;
  std::memset(&p, 0, sizeof p);
  p.guidance = 7.0f;
  p.reschedule = 1;
  p.dilation = 2;
  return p;
}

struct Parsed {
  int rc;
  std::string error;
  mfcli::CommandLine cl;
  mf_generate_params params;
};

// The required flags, then `extra`.
Parsed parse(const std::vector<std::string>& extra, const std::string& ids = g_ids) {
  std::vector<std::string> args = {"mf-generate-cpp", "--engines", "E", "--model", "tiny-sd15", "--ids", ids,
                                   "--output", "o.png"};
  args.insert(args.end(), extra.begin(), extra.end());
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  Parsed p{0, "", {}, defaults()};
  p.rc = mfcli::parse_command_line(static_cast<int>(argv.size()), argv.data(), p.cl, p.params, p.error);
  return p;
}

void refused(const std::vector<std::string>& extra, const std::string& message, const std::string& ids = g_ids) {
  const Parsed p = parse(extra, ids);
  std::string what;
  for (const auto& a : extra) what += (what.empty() ? "" : " ") + a;
  if (what.empty()) what = "--ids " + ids.substr(ids.rfind('/') + 1);
  check(p.rc == 2 && p.error == message && p.error.find('\n') == std::string::npos,
        what + " -> status " + std::to_string(p.rc) + ", \"" + p.error + "\"");
}

std::string ids_line(const std::string& head, int n, const std::string& tail = "") {
  std::string line = head;
  for (int i = 0; i < n; ++i) line += " " + std::to_string(i == 0 ? 49406 : 320 + i);
  return line + tail + "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return std::cerr << "usage: cli_args SCRATCH_DIR\n", 2;
  // A fresh folder of its own inside SCRATCH_DIR: nothing the caller keeps there is touched (it once emptied
  // SCRATCH_DIR itself, which run by hand with /tmp emptied /tmp).
  std::error_code ec;
  std::filesystem::create_directories(argv[1], ec);
  std::string made = (std::filesystem::path(argv[1]) / "cli-args-XXXXXX").string();
  if (ec || mkdtemp(made.data()) == nullptr)
    return std::cerr << "cli_args: cannot make a scratch folder in " << argv[1] << "\n", 2;
  const std::string dir = made;
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir + "/" + name) << text;
    return dir + "/" + name;
  };
  g_ids = write("ids.txt", "# megafusion token ids: model tiny-sd15, prompt 'a fox', negative ''\n" +
                               ids_line("prompt 0", 77) + ids_line("negative 0", 77));

  // Good command lines.
  Parsed p = parse({"--seed", "18446744073709551615", "--guidance", "7.5", "--steps", "30", "--size", "256x128",
                    "--dilation", "3", "--repeats", "2", "--no-reschedule", "--verify-hashes"});
  check(p.rc == 0 && p.error.empty() && p.params.seed == 18446744073709551615ull && p.params.guidance == 7.5f &&
            p.params.total_steps == 30 && p.params.width == 256 && p.params.height == 128 &&
            p.params.dilation == 3 && p.cl.repeats == 2 && p.params.reschedule == 0,
        "every flag at a valid value: " + p.error);
  check(p.cl.prompt.size() == 1 && p.cl.prompt[0].size() == MF_TOKEN_LENGTH && p.cl.prompt[0][0] == 49406 &&
            p.cl.negative.size() == 1 && p.cl.negative[0][76] == 396,
        "token file read");
  p = parse({"--seed", "0", "--guidance", "0", "--size", " 1024 X 768 "});
  check(p.rc == 0 && p.params.seed == 0 && p.params.guidance == 0.0f && p.params.width == 1024 &&
            p.params.height == 768,
        "seed 0, guidance 0, size with spaces and X (as core/plan.py parse_size): " + p.error);
  p = parse({"--help"});
  check(p.rc == 0 && p.cl.help, "--help");
  p = parse({});
  check(p.rc == 0 && p.params.seed == 0 && p.params.guidance == 7.0f && p.params.total_steps == 0 &&
            p.params.dilation == 2 && p.cl.graphs,
        "defaults untouched when not given (CUDA graphs on)");
  p = parse({"--no-graphs"});
  check(p.rc == 0 && !p.cl.graphs, "--no-graphs turns the step graphs off");
  check(!p.cl.progress && p.cl.deadline_s < 0, "no progress lines and no deadline unless asked");
  p = parse({"--progress", "--deadline", "0"});
  check(p.rc == 0 && p.cl.progress && p.cl.deadline_s == 0.0f, "--progress; --deadline 0 (stop at the first step)");
  refused({"--deadline", "-1"}, "--deadline -1: must be a number of seconds >= 0");
  refused({"--deadline", "soon"}, "--deadline 'soon': expected a finite number");

  // --image / --controlnet and their numbers.
  p = parse({"--image", "a.ppm"});
  check(p.rc == 0 && p.cl.image == "a.ppm" && p.cl.strength == 0.8f && p.cl.start_stage == 0,
        "--image alone: strength 0.8 (diffusers' default): " + p.error);
  p = parse({"--image", "a.ppm", "--start-stage", "2"});
  check(p.rc == 0 && p.cl.strength == 0.0f && p.cl.start_stage == 2, "--start-stage alone: strength 0 (its first step)");
  p = parse({"--controlnet", "a", "--control-image", "a.ppm", "--controlnet", "b", "--control-image", "b.ppm",
             "--control-scale", "0.5", "--control-end", "0.8", "--control-end", "0.6"});
  check(p.rc == 0 && p.cl.controlnets.size() == 2 && p.cl.control_scales == std::vector<float>{0.5f, 0.5f} &&
            p.cl.control_starts == std::vector<float>{0.0f, 0.0f} && p.cl.control_ends == std::vector<float>{0.8f, 0.6f},
        "two ControlNets: a scale for both, an end each, the default start: " + p.error);
  refused({"--strength", "0.5"}, "--strength and --start-stage need --image");
  refused({"--image", "a.ppm", "--strength", "0"}, "--strength 0: must be a number in (0, 1]");
  refused({"--image", "a.ppm", "--strength", "nan"}, "--strength 'nan': expected a finite number");
  refused({"--image", "a.ppm", "--start-stage", "0"}, "--start-stage '0': must be an integer from 1 to 2147483647");
  refused({"--controlnet", "a"}, "give one --control-image per --controlnet (1 --controlnet, 0 --control-image)");
  refused({"--control-scale", "2"}, "--control-scale needs --controlnet");
  refused({"--controlnet", "a", "--control-image", "a.ppm", "--control-start", "0.1", "--control-start", "0.2"},
          "--control-start given 2 times for 1 --controlnet; give it once or once per ControlNet");
  refused({"--controlnet", "a", "--control-image", "a.ppm", "--control-scale", "inf"},
          "--control-scale 'inf': expected a finite number");

  // --ip-adapter-embeds: a file of float32 values (raw or .npy), not with a ControlNet.
  p = parse({"--ip-adapter-embeds", "e.npy"});
  check(p.rc == 0 && p.cl.ip_embeds == "e.npy", "--ip-adapter-embeds kept");
  refused({"--ip-adapter-embeds", "e.npy", "--controlnet", "a", "--control-image", "a.ppm"},
          "--ip-adapter-embeds with --controlnet: the IP-Adapter engines take no ControlNet; give one or the other");
  // --ip-adapter-image: a PPM, not with a ControlNet nor with embeds.
  p = parse({"--ip-adapter-image", "ref.ppm"});
  check(p.rc == 0 && p.cl.ip_image == "ref.ppm" && p.cl.ip_embeds.empty(), "--ip-adapter-image kept");
  refused({"--ip-adapter-image", "ref.ppm", "--controlnet", "a", "--control-image", "a.ppm"},
          "--ip-adapter-image with --controlnet: the IP-Adapter engines take no ControlNet; give one or the other");
  refused({"--ip-adapter-image", "ref.ppm", "--ip-adapter-embeds", "e.npy"},
          "--ip-adapter-image and --ip-adapter-embeds exclude each other (the image gives the embeddings)");
  auto embeds_error = [](const std::string& path) {
    try {
      mfembeds::read("--ip-adapter-embeds", path);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("read");
  };
  const float values[3] = {0.5f, -2.0f, 3.25f};
  const std::string raw = write("e.f32", std::string(reinterpret_cast<const char*>(values), sizeof values));
  check(mfembeds::read("f", raw) == std::vector<float>(values, values + 3), "raw float32 embeds read");
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }";
  header += std::string(128 - 10 - header.size() - 1, ' ') + "\n";  // numpy pads the whole to 64-byte blocks
  const std::string npy = std::string("\x93NUMPY\x01\x00", 8) + char(header.size()) + '\0' + header;
  const std::string good = write("e.npy", npy + std::string(reinterpret_cast<const char*>(values), sizeof values));
  check(mfembeds::read("f", good) == std::vector<float>(values, values + 3), ".npy float32 embeds read");
  std::string f8 = npy;
  f8.replace(f8.find("<f4"), 3, "<f8");
  const std::string doubles = write("d.npy", f8 + std::string(24, '\0'));
  check(embeds_error(doubles) == "--ip-adapter-embeds '" + doubles + "': the .npy array is not float32 little-endian "
                                 "('<f4'); save embeds.astype('<f4')", "float64 .npy refused");
  const std::string odd = write("odd.f32", "abcde");
  check(embeds_error(odd) == "--ip-adapter-embeds '" + odd + "': 5 bytes of values, not a positive multiple of 4 "
                             "(float32)", "5 bytes refused");
  check(embeds_error(dir + "/none.f32") == "--ip-adapter-embeds '" + dir + "/none.f32': cannot open the file",
        "missing embeds file refused");

  // --seed: an integer 0 <= seed < 2^64.
  refused({"--seed", "abc"}, "--seed 'abc': must be an integer 0 <= seed < 2^64");
  refused({"--seed", "-1"}, "--seed '-1': must be an integer 0 <= seed < 2^64");
  refused({"--seed", "18446744073709551616"}, "--seed '18446744073709551616': must be an integer 0 <= seed < 2^64");
  refused({"--seed", "12abc"}, "--seed '12abc': must be an integer 0 <= seed < 2^64");
  refused({"--seed", ""}, "--seed '': must be an integer 0 <= seed < 2^64");
  // --guidance: finite and >= 0.
  refused({"--guidance", "abc"}, "--guidance 'abc': must be a finite number >= 0");
  refused({"--guidance", "nan"}, "--guidance 'nan': must be a finite number >= 0");
  refused({"--guidance", "inf"}, "--guidance 'inf': must be a finite number >= 0");
  refused({"--guidance", "-1"}, "--guidance '-1': must be a finite number >= 0");
  refused({"--guidance", "1e39"}, "--guidance '1e39': must be a finite number >= 0");  // inf as a float
  refused({"--guidance", "7.5x"}, "--guidance '7.5x': must be a finite number >= 0");
  // --steps, --dilation, --repeats: whole integers >= 1.
  refused({"--steps", "abc"}, "--steps 'abc': not an integer");
  refused({"--steps", "50junk"}, "--steps '50junk': not an integer");
  refused({"--steps", "0"}, "--steps '0': must be an integer from 1 to 2147483647");
  refused({"--steps", "-5"}, "--steps '-5': must be an integer from 1 to 2147483647");
  refused({"--steps", "99999999999"}, "--steps '99999999999': must be an integer from 1 to 2147483647");
  refused({"--steps", "20", "--stages", "128x128:20"},
          "--steps and --stages exclude each other (give steps per stage in --stages)");
  refused({"--dilation", "0"}, "--dilation '0': must be an integer from 1 to 2147483647");
  refused({"--dilation", "9"}, "--dilation 9: must be at most 8 (the paper uses 2; past 8 a 3x3 kernel's taps lie "
                               "farther apart than SD1.5's 8x8 native mid-block map)");
  refused({"--repeats", "abc"}, "--repeats 'abc': not an integer");
  // --size: WIDTHxHEIGHT, each side 1 to 16384.
  refused({"--size", "0x0"}, "--size '0x0': each side must be between 1 and 16384 pixels");
  refused({"--size", "256x256junk"}, "--size '256x256junk': expected WIDTHxHEIGHT, e.g. 1920x1080");
  refused({"--size", "256"}, "--size '256': expected WIDTHxHEIGHT, e.g. 1920x1080");
  refused({"--size", "-256x256"}, "--size '-256x256': expected WIDTHxHEIGHT, e.g. 1920x1080");
  refused({"--size", "16385x256"}, "--size '16385x256': each side must be between 1 and 16384 pixels");
  refused({"--size", "99999999999999999999x1"},
          "--size '99999999999999999999x1': each side must be between 1 and 16384 pixels");
  // Flags.
  refused({"--bogus"}, "unknown argument '--bogus' (see --help)");
  refused({"--seed"}, "--seed needs a value");

  // --ids: token ids 0 <= id < 2^31, nothing else on a line.
  const std::string big = write("big.txt", ids_line("prompt 0", 76, " 4294967296"));
  refused({}, "--ids '" + big + "' line 1: token id '4294967296' is not an integer 0 <= id < 2^31", big);
  const std::string big31 = write("big31.txt", ids_line("prompt 0", 76, " 2147483648"));
  refused({}, "--ids '" + big31 + "' line 1: token id '2147483648' is not an integer 0 <= id < 2^31", big31);
  const std::string junk = write("junk.txt", ids_line("prompt 0", 77, " junk"));
  refused({}, "--ids '" + junk + "' line 1: token id 'junk' is not an integer 0 <= id < 2^31", junk);
  const std::string glued = write("glued.txt", ids_line("prompt 0", 77, "junk"));
  refused({}, "--ids '" + glued + "' line 1: token id '396junk' is not an integer 0 <= id < 2^31", glued);
  const std::string negative_id = write("negative_id.txt", ids_line("prompt 0", 76, " -5"));
  refused({}, "--ids '" + negative_id + "' line 1: token id '-5' is not an integer 0 <= id < 2^31", negative_id);
  const std::string short_line = write("short.txt", ids_line("prompt 0", 76));
  refused({}, "--ids '" + short_line + "' line 1: prompt 0 has 76 ids, expected 77", short_line);
  const std::string junk_line = write("junk_line.txt", ids_line("prompt 0", 77) + "garbage\n");
  refused({}, "--ids '" + junk_line + "' line 2: expected 'prompt I id...' or 'negative I id...', got 'garbage'",
          junk_line);
  const std::string twice = write("twice.txt", ids_line("prompt 0", 77) + ids_line("prompt 0", 77));
  refused({}, "--ids '" + twice + "' line 2: a second 'prompt 0' line", twice);
  const std::string index = write("index.txt", ids_line("prompt 2", 77));
  refused({}, "--ids '" + index + "' line 1: text encoder index '2' must be 0 to 1", index);
  const std::string gap = write("gap.txt", ids_line("prompt 1", 77));
  refused({}, "--ids '" + gap + "': no 'prompt 0' line", gap);
  const std::string none = write("none.txt", ids_line("negative 0", 77));
  refused({}, "--ids '" + none + "': no prompt ids", none);
  refused({}, "--ids '" + dir + "/missing.txt': cannot read the token file", dir + "/missing.txt");

  std::cout << g_failures << " failure(s)\n";
  std::filesystem::remove_all(dir, ec);
  return g_failures == 0 ? 0 : 1;
}
