// The Python module normkernels._C: cpu_capability(), the output pool's controls, and the eager
// per-call fast path of normkernels.functional. It links against the library of the ops
// (normkernels/libnormkernels_ops.so, csrc/ops.cpp), so importing it registers them.
//
// The fast path: C entry points that validate a call
// and run the op through the full dispatcher (so autograd, dispatch modes and every backend still
// apply), skipping the Python-side argument handling and torch.ops' Python wrapper.
//
// Why: a 1x768 layer norm is ~0.5 us of arithmetic; through torch.ops and the Python checks it
// cost ~4.8 us against torch's ~2.7 us. Each entry returns None whenever the call is not the
// plain case (a tensor subclass or a __torch_function__ mode, a non-CPU tensor, a shape, dtype
// or argument the fast path does not check): functional.py then takes its documented path,
// which raises torch's exception types with torch's messages. Under torch.compile functional.py
// never calls these (Dynamo cannot trace into C), so the graph holds the torch.ops ops.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include "cpu/output_pool.h"
#include "op_handles.h"

namespace normkernels {
const char* cpu_capability_name();  // cpu/register.cpp

namespace {

using at::Tensor;
using ops::Opt;

PyTypeObject* tensor_type = nullptr;     // torch.Tensor
PyTypeObject* parameter_type = nullptr;  // torch.nn.Parameter (its __torch_function__ is off)

// A plain CPU tensor (or Parameter): nothing that could override the call from Python.
bool plain_tensor(PyObject* obj) {
  const PyTypeObject* t = Py_TYPE(obj);
  return (t == tensor_type || t == parameter_type) && THPVariable_Unpack(obj).is_cpu();
}

bool optional_tensor(PyObject* obj, Opt& out) {
  if (obj == Py_None) return true;
  if (!plain_tensor(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

bool float_arg(PyObject* obj, double& out) {
  if (!PyFloat_Check(obj) && !PyLong_Check(obj)) return false;
  out = PyFloat_AsDouble(obj);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool int_arg(PyObject* obj, int64_t& out) {
  if (!PyLong_Check(obj)) return false;
  int overflow = 0;
  out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (out == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool bool_arg(PyObject* obj, bool& out) {
  if (obj != Py_True && obj != Py_False) return false;
  out = obj == Py_True;
  return true;
}

// normalized_shape: an int, or a tuple/list (torch.Size included) of ints.
bool shape_arg(PyObject* obj, std::vector<int64_t>& out) {
  int64_t d = 0;
  if (int_arg(obj, d)) {
    out.assign(1, d);
    return true;
  }
  if (!PyTuple_Check(obj) && !PyList_Check(obj)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!int_arg(items[i], out[i])) return false;
  return true;
}

bool shape_is(const Opt& p, at::IntArrayRef shape) { return !p || p->sizes() == shape; }

// The parameter dtypes torch's CPU layer/group/batch norms accept (functional.
// _check_param_dtypes): all alike, and the input's, or fp32 for a half-precision input. Other
// combinations go to the Python path, which raises torch's error.
bool param_dtypes_ok(const Tensor& x, std::initializer_list<const Opt*> params) {
  if (!x.is_cpu()) return true;
  std::optional<at::ScalarType> common;
  for (const Opt* p : params) {
    if (!*p || !(*p)->defined()) continue;
    const at::ScalarType t = (*p)->scalar_type();
    if (common && *common != t) return false;
    common = t;
  }
  if (!common) return true;
  const at::ScalarType xt = x.scalar_type();
  return *common == xt || (*common == at::kFloat && (xt == at::kBFloat16 || xt == at::kHalf));
}

PyObject* fall_back() { Py_RETURN_NONE; }

PyObject* wrap(Tensor t) { return THPVariable_Wrap(std::move(t)); }

// Runs `f` without the GIL, as torch's own bindings do around a kernel.
template <typename F>
auto without_gil(F f) {
  PyThreadState* state = PyEval_SaveThread();
  struct Restore {
    PyThreadState* s;
    ~Restore() { PyEval_RestoreThread(s); }
  } restore{state};
  return f();
}

// Not under a torch function mode, nor under torch.jit.trace: the tracer records the ops called
// through the dispatcher, but not the running-statistics update below (a loop), so a traced
// training step would leave the statistics alone; the Python path updates them with ATen ops.
bool fast_path_allowed() {
  return !at::impl::torch_function_mode_enabled() && !torch::jit::tracer::isTracing();
}

// layer_norm(input, normalized_shape, weight, bias, eps, rms) -> Tensor | None
PyObject* layer_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 || !fast_path_allowed() || !plain_tensor(args[0])) return fall_back();
  const Tensor& x = THPVariable_Unpack(args[0]);
  std::vector<int64_t> shape;
  Opt w, b;
  double eps = 0;
  bool rms = false;
  if (!shape_arg(args[1], shape) || !optional_tensor(args[2], w) ||
      !optional_tensor(args[3], b) || !float_arg(args[4], eps) || !bool_arg(args[5], rms))
    return fall_back();
  const int64_t k = static_cast<int64_t>(shape.size());
  if (k == 0 || x.dim() < k || !x.is_floating_point() ||
      x.sizes().slice(x.dim() - k) != at::IntArrayRef(shape) || !shape_is(w, shape) ||
      !shape_is(b, shape) || (!rms && !param_dtypes_ok(x, {&w, &b})))
    return fall_back();
  return wrap(without_gil(
      [&] { return std::get<0>(ops::layer_norm_fwd().call(x, k, w, b, eps, rms)); }));
  END_HANDLE_TH_ERRORS
}

// group_norm(input, num_groups, weight, bias, eps) -> Tensor | None
PyObject* group_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !fast_path_allowed() || !plain_tensor(args[0])) return fall_back();
  const Tensor& x = THPVariable_Unpack(args[0]);
  int64_t groups = 0;
  Opt w, b;
  double eps = 0;
  if (!int_arg(args[1], groups) || !optional_tensor(args[2], w) ||
      !optional_tensor(args[3], b) || !float_arg(args[4], eps))
    return fall_back();
  if (x.dim() < 2 || !x.is_floating_point() || groups <= 0 || x.size(1) % groups != 0 ||
      !shape_is(w, {x.size(1)}) || !shape_is(b, {x.size(1)}) || !param_dtypes_ok(x, {&w, &b}))
    return fall_back();
  // torch refuses a single value per group (x.numel() / (N * groups) == 1)
  if (x.size(0) > 0 && x.numel() / x.size(0) == groups) return fall_back();
  return wrap(without_gil(
      [&] { return std::get<0>(ops::group_norm_fwd().call(x, groups, w, b, eps)); }));
  END_HANDLE_TH_ERRORS
}

// running = (1 - momentum) * running + momentum * batch, element by element, in double (as
// torch's CPU batch norm does), for contiguous CPU running statistics.
template <typename R, typename S>
void blend_into(R* running, const S* batch, int64_t n, double momentum, double batch_scale) {
  for (int64_t i = 0; i < n; ++i)
    running[i] = static_cast<R>(momentum * batch_scale * static_cast<double>(batch[i]) +
                                (1.0 - momentum) * static_cast<double>(running[i]));
}

void blend_running(Tensor& running, const Tensor& batch, double momentum, double batch_scale) {
  if (!running.is_contiguous() || !batch.is_contiguous()) {
    at::NoGradGuard no_grad;
    running.mul_(1.0 - momentum).add_(batch.mul(batch_scale).to(running.scalar_type()), momentum);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "running", [&] {
    using R = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(batch.scalar_type(), "batch", [&] {
      blend_into(running.data_ptr<R>(), batch.const_data_ptr<scalar_t>(), running.numel(),
                 momentum, batch_scale);
    });
  });
}

// Running statistics from a batch of `count` values per channel, by torch's rule (the mean,
// and the variance made unbiased); the rule of functional._update_running_stats, which the
// Python path and torch.compile use. A loop, not ATen ops: six tiny ATen calls cost more than a
// small batch norm itself.
void update_running_stats(Opt& running_mean, Opt& running_var, const Tensor& mean,
                          const Tensor& biased_var, int64_t count, double momentum) {
  if (count <= 0) return;
  if (running_mean) blend_running(*running_mean, mean, momentum, 1.0);
  if (running_var)
    blend_running(*running_var, biased_var, momentum,
                  static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
}

// batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
//   -> Tensor | None
PyObject* batch_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8 || !fast_path_allowed() || !plain_tensor(args[0])) return fall_back();
  const Tensor& x = THPVariable_Unpack(args[0]);
  Opt rm, rv, w, b;
  bool training = false;
  double momentum = 0, eps = 0;
  if (!optional_tensor(args[1], rm) || !optional_tensor(args[2], rv) ||
      !optional_tensor(args[3], w) || !optional_tensor(args[4], b) ||
      !bool_arg(args[5], training) || !float_arg(args[6], momentum) ||
      !float_arg(args[7], eps))
    return fall_back();
  if (x.dim() < 2 || !x.is_floating_point()) return fall_back();
  const int64_t channels = x.size(1);
  if (!shape_is(w, {channels}) || !shape_is(b, {channels}) ||
      (rm && rm->numel() != channels) || (rv && rv->numel() != channels) ||
      !param_dtypes_ok(x, {&w, &b, &rm, &rv}))
    return fall_back();
  // running statistics that require grad: torch's error, from the Python path
  if (c10::GradMode::is_enabled() &&
      ((rm && rm->requires_grad()) || (rv && rv->requires_grad())))
    return fall_back();
  if (!training) {
    if (!rm || !rv) return fall_back();
    return wrap(without_gil(
        [&] { return ops::batch_norm_infer().call(x, *rm, *rv, w, b, eps); }));
  }
  const int64_t count = channels > 0 ? x.numel() / channels : 0;
  // torch's "more than 1 value per channel" error; one running statistic without the other
  // (which recent torch refuses: functional._check_running_pair)
  if (count == 1 || channels == 0 || rm.has_value() != rv.has_value()) return fall_back();
  return wrap(without_gil([&] {
    auto [y, mean, invstd, var] = ops::batch_norm_fwd().call(x, w, b, eps);
    update_running_stats(rm, rv, mean, var, count, momentum);
    return y;
  }));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"layer_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(layer_norm)),
     METH_FASTCALL, "Fast path of functional.layer_norm/rms_norm; None: take the Python path."},
    {"group_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(group_norm)),
     METH_FASTCALL, "Fast path of functional.group_norm; None: take the Python path."},
    {"batch_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(batch_norm)),
     METH_FASTCALL, "Fast path of functional.batch_norm; None: take the Python path."},
    {nullptr, nullptr, 0, nullptr}};

// Adds the fast-path entry points to the module.
int add_fast_paths(PyObject* module) {
  PyObject* torch = PyImport_ImportModule("torch");
  if (torch == nullptr) return -1;
  PyObject* tensor = PyObject_GetAttrString(torch, "Tensor");
  PyObject* nn = PyImport_ImportModule("torch.nn.parameter");
  PyObject* parameter = nn ? PyObject_GetAttrString(nn, "Parameter") : nullptr;
  Py_DECREF(torch);
  Py_XDECREF(nn);
  if (tensor == nullptr || parameter == nullptr) {
    Py_XDECREF(tensor);
    Py_XDECREF(parameter);
    return -1;
  }
  // module-lifetime references to the two types
  tensor_type = reinterpret_cast<PyTypeObject*>(tensor);
  parameter_type = reinterpret_cast<PyTypeObject*>(parameter);
  return PyModule_AddFunctions(module, methods);
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(cpu_capability_name());
}

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  size_t freed = 0;
  Py_BEGIN_ALLOW_THREADS freed = cpu::empty_cpu_cache();
  Py_END_ALLOW_THREADS return PyLong_FromSize_t(freed);
}

PyObject* cached_cpu_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(cpu::cached_cpu_bytes());
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The SIMD build of the CPU kernels chosen for this CPU: DEFAULT, AVX2 or AVX512."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS,
     "Frees the idle blocks of the CPU output pool; returns the bytes given back."},
    {"cached_cpu_bytes", cached_cpu_bytes, METH_NOARGS,
     "Bytes of freed outputs the CPU pool holds for reuse."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};

}  // namespace
}  // namespace normkernels

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&normkernels::module_def);
  if (module != nullptr && normkernels::add_fast_paths(module) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
