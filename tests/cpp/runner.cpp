// A serving process without Python: loads normkernels' ops library, then runs a model exported
// from Python on one input and writes its first output. What a C++ deployment of a converted
// model does; tests/test_compile_and_dispatch.py builds and runs it.
//
//   runner OPS_LIBRARY MODEL INPUT OUTPUT
//
// OPS_LIBRARY: normkernels/libnormkernels_ops.so (normkernels.ops_library_path()), or "-" to
// load none (then the model cannot find our ops). MODEL: an AOTInductor package (*.pt2, from
// torch._inductor.aoti_compile_and_package) or a TorchScript file (torch.jit.save). INPUT: a
// tensor written by torch.save; OUTPUT: written for torch.load.
#include <dlfcn.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

at::Tensor run(const std::string& model, const at::Tensor& x) {
  if (ends_with(model, ".pt2")) {
    torch::inductor::AOTIModelPackageLoader loader(model);
    return loader.run({x}).at(0);
  }
  torch::jit::Module module = torch::jit::load(model);
  return module.forward({x}).toTensor();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s OPS_LIBRARY|- MODEL INPUT OUTPUT\n", argv[0]);
    return 2;
  }
  // Loading the library registers the ops with the dispatcher, where the model looks them up.
  if (std::string(argv[1]) != "-" && dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "%s\n", dlerror());
    return 2;
  }
  try {
    std::ifstream input(argv[3], std::ios::binary);
    const std::vector<char> input_bytes{std::istreambuf_iterator<char>(input),
                                        std::istreambuf_iterator<char>()};
    const at::Tensor x = torch::jit::pickle_load(input_bytes).toTensor();
    const std::vector<char> output_bytes = torch::jit::pickle_save(run(argv[2], x));
    std::ofstream(argv[4], std::ios::binary)
        .write(output_bytes.data(), static_cast<std::streamsize>(output_bytes.size()));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
