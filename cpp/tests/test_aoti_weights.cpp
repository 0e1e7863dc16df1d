// The weights of --weights-apart entries in libmegafusion (cpp/src/lib/aoti_weights.hpp), on an engine folder
// whose UNets were built with --weights-apart (argv[1]): the standard and dilated UNets' files have the same
// sha256, so opening both reads the file once and both packages get the very same tensors; once no package holds
// them, the next open reads the file again (engine/aoti_shared.py's rule).
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "../src/lib/aoti_weights.hpp"
#include "../src/lib/context.hpp"

#include "check.hpp"

using namespace megafusion::lib;
using megafusion::testing::check;
using megafusion::testing::g_failures;

int main(int argc, char** argv) {
  if (argc != 2) return std::cerr << "usage: megafusion_aoti_weights_test <engine folder>\n", 2;
  const EngineFolder folder = read_engine_folder(argv[1]);
  std::vector<Entry> apart;
  for (const Entry& e : folder.entries)
    if (e.network == "unet" && e.constants == "apart") apart.push_back(e);
  check(apart.size() == 2, "two --weights-apart UNets (standard and dilated): " + std::to_string(apart.size()));
  if (apart.size() != 2) return 1;
  const at::Device cpu(at::kCPU);
  for (const Entry& e : apart) verify_files(folder.root, e);
  const size_t before = weight_files_read();
  {
    std::vector<std::unique_ptr<AotiNetwork>> nets;
    for (const Entry& e : apart) nets.push_back(std::make_unique<AotiNetwork>(folder.root, e, cpu));
    check(weight_files_read() == before + 1, "two packages of one file read it once");
    auto a = shared_weights(folder.root, apart[0], cpu), b = shared_weights(folder.root, apart[1], cpu);
    check(a == b && weight_files_read() == before + 1, "both entries get the same tensors, not read again");
    const at::Tensor& t = a->tensors.begin()->second;
    check(!a->tensors.empty() && t.device().is_cpu() && t.numel() > 0, "the tensors are on the context's device");
  }
  shared_weights(folder.root, apart[0], cpu);
  check(weight_files_read() == before + 2, "once no package holds them, an open reads the file again");
  std::cout << (g_failures ? "FAILED " : "passed ") << g_failures << " failures\n";
  return g_failures ? 1 : 0;
}
