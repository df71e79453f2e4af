// A serving process without Python: loads normkernels' ops library, then runs an AOTInductor
// package (torch._inductor.aoti_compile_and_package) on one input and writes its first output.
// What a C++ deployment of a converted model does; tests/test_compile_and_dispatch.py builds and
// runs it.
//
//   aoti_runner OPS_LIBRARY PACKAGE INPUT OUTPUT
//
// OPS_LIBRARY: normkernels/libnormkernels_ops.so (normkernels.ops_library_path()), or "-" to
// load none (then the package cannot find our ops). INPUT: a tensor written by torch.save;
// OUTPUT: written for torch.load.
#include <dlfcn.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s OPS_LIBRARY|- PACKAGE INPUT OUTPUT\n", argv[0]);
    return 2;
  }
  // Loading the library registers the ops with the dispatcher, where the package looks them up.
  if (std::string(argv[1]) != "-" && dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "%s\n", dlerror());
    return 2;
  }
  try {
    std::ifstream input(argv[3], std::ios::binary);
    const std::vector<char> input_bytes{std::istreambuf_iterator<char>(input),
                                        std::istreambuf_iterator<char>()};
    const at::Tensor x = torch::jit::pickle_load(input_bytes).toTensor();
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    const std::vector<at::Tensor> outputs = loader.run({x});
    const std::vector<char> output_bytes = torch::jit::pickle_save(outputs.at(0));
    std::ofstream(argv[4], std::ios::binary)
        .write(output_bytes.data(), static_cast<std::streamsize>(output_bytes.size()));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
