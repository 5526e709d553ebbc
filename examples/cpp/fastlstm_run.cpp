// Runs a model that uses fastlstm from C++, without Python: the op library (fastlstm/_C*.so, with its
// CPU kernels and its autograd) is loaded with dlopen(RTLD_NOW), which fails if any symbol in it is
// unresolved, then
//   fastlstm_run traced <op library> <model.pt> <input.pt> <result.pt>
//     loads a torch.jit.trace'd module, runs forward and backward (input and parameter gradients) and
//     saves [output, grad_input, grad_param_0, ...] to result.pt;
//   fastlstm_run aoti <op library> <model.pt2> <input.pt> <result.pt>
//     loads an AOTInductor package, runs it and saves [output] to result.pt.
// Tensors are exchanged in torch.save's format (torch::pickle_load / torch::pickle_save), e.g.
//   torch.save(x, "input.pt");  torch.load("result.pt")
#include <dlfcn.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/serialize.h>

namespace {

at::Tensor load_tensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

void save_tensors(const std::vector<at::Tensor>& tensors, const std::string& path) {
  // A tuple, which torch.load(..., weights_only=True) accepts (a typed list of tensors it does not).
  const std::vector<c10::IValue> values(tensors.begin(), tensors.end());
  const std::vector<char> bytes = torch::pickle_save(c10::ivalue::Tuple::create(values));
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: " << argv[0]
              << " traced|aoti <op libraries, ':'-separated> <model> <input.pt> <result.pt>\n";
    return 2;
  }
  const std::string mode = argv[1];
  // fastlstm's core library (schemas, autograd, CUDA) and the CPU kernels built for this CPU's
  // instruction set: fastlstm.library_paths() in Python lists both. RTLD_GLOBAL is not needed: each
  // library registers its ops with the dispatcher when it loads.
  std::string libraries = argv[2];
  for (size_t begin = 0, end; begin <= libraries.size(); begin = end + 1) {
    end = libraries.find(':', begin);
    if (end == std::string::npos) end = libraries.size();
    const std::string path = libraries.substr(begin, end - begin);
    if (!path.empty() && dlopen(path.c_str(), RTLD_NOW) == nullptr) {
      std::cerr << "dlopen failed: " << dlerror() << "\n";
      return 1;
    }
  }
  const at::Tensor input = load_tensor(argv[4]);
  std::vector<at::Tensor> result;
  if (mode == "traced") {
    torch::jit::Module module = torch::jit::load(argv[3]);
    const at::Tensor x = input.clone().requires_grad_(true);
    const auto out = module.forward({x}).toTuple();  // (output, (h_n, c_n)), as torch.nn.LSTM
    const at::Tensor output = out->elements()[0].toTensor();
    const auto state = out->elements()[1].toTuple();
    (output.pow(2).sum() + state->elements()[0].toTensor().sum() +
     state->elements()[1].toTensor().sum())
        .backward();
    result = {output.detach(), x.grad()};
    for (const auto& p : module.parameters()) result.push_back(p.grad());
  } else if (mode == "aoti") {
    torch::inductor::AOTIModelPackageLoader loader(argv[3]);
    torch::NoGradGuard no_grad;
    result = {loader.run({input})[0]};
  } else {
    std::cerr << "unknown mode " << mode << "\n";
    return 2;
  }
  save_tensors(result, argv[5]);
  std::cout << "ok: " << mode << ", output " << result[0].sizes() << "\n";
  return 0;
}
