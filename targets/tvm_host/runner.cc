// Minimal TVM Relax VM host for a quantflow bundle: load model.so, run `main`, save outputs.
//
//   runner <model.so> <out_dir> <input0.npy> [<input1.npy> ...] [--repeat N]
//
// Inputs and outputs are .npy files (format version 1.0/2.0, little-endian, C order), so the
// host side needs only numpy. Outputs are written as <out_dir>/output_<i>.npy. With
// --repeat N the model runs N more times and the median wall time is printed (for on-board
// latency; under qemu the number is meaningless).
//
// Only tvm-ffi headers are used (the apache-tvm wheel ships tvm/runtime headers whose
// includes are missing); libtvm_runtime.so is linked with --no-as-needed so that its
// module loader and the Relax VM register themselves when the runner starts.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

namespace {

// Host allocator for ffi::Tensor::FromNDAlloc: 64-byte aligned, as TVM kernels expect.
struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = t->dtype.bits / 8;
    for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

size_t NumBytes(const DLTensor* t) {
  size_t n = t->dtype.bits / 8;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

struct DTypeInfo {
  const char* descr;  // numpy descr
  DLDataType dl;
};

const DTypeInfo kTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"|u1", {kDLUInt, 8, 1}},
    {"|i1", {kDLInt, 8, 1}},    {"<i4", {kDLInt, 32, 1}},   {"<i8", {kDLInt, 64, 1}},
};

DLDataType DTypeOf(const std::string& descr) {
  for (const auto& t : kTypes)
    if (descr == t.descr) return t.dl;
  throw std::runtime_error("unsupported npy dtype " + descr);
}

std::string DescrOf(DLDataType dt) {
  for (const auto& t : kTypes)
    if (t.dl.code == dt.code && t.dl.bits == dt.bits) return t.descr;
  throw std::runtime_error("unsupported output dtype");
}

// Value of key `key` in the npy header dict, e.g. "'descr': '<f4'" -> "<f4".
std::string HeaderField(const std::string& h, const std::string& key) {
  size_t k = h.find("'" + key + "'");
  if (k == std::string::npos) throw std::runtime_error("npy header lacks " + key);
  size_t colon = h.find(':', k);
  size_t start = h.find_first_not_of(' ', colon + 1);
  if (h[start] == '\'') return h.substr(start + 1, h.find('\'', start + 1) - start - 1);
  if (h[start] == '(') return h.substr(start + 1, h.find(')', start) - start - 1);
  return h.substr(start, h.find_first_of(",}", start) - start);
}

Tensor LoadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not .npy");
  uint32_t hlen = 0;
  if (magic[6] == 1) {
    uint16_t h16;
    f.read(reinterpret_cast<char*>(&h16), 2);
    hlen = h16;
  } else {
    f.read(reinterpret_cast<char*>(&hlen), 4);
  }
  std::string header(hlen, ' ');
  f.read(header.data(), hlen);
  if (HeaderField(header, "fortran_order") != "False")
    throw std::runtime_error(path + ": Fortran order not supported");
  std::vector<int64_t> shape;
  std::stringstream dims(HeaderField(header, "shape"));
  for (std::string d; std::getline(dims, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(d));
  DLDataType dt = DTypeOf(HeaderField(header, "descr"));
  Tensor t = Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), dt, DLDevice{kDLCPU, 0});
  size_t nbytes = NumBytes(t.GetDLTensorPtr());
  f.read(static_cast<char*>(t.data_ptr()), nbytes);
  if (static_cast<size_t>(f.gcount()) != nbytes) throw std::runtime_error(path + ": truncated");
  return t;
}

void SaveNpy(const std::string& path, const Tensor& tensor) {
  const DLTensor* t = tensor.GetDLTensorPtr();
  if (t->device.device_type != kDLCPU || !tensor.IsContiguous())
    throw std::runtime_error("output is not a contiguous CPU tensor");
  std::ostringstream h;
  h << "{'descr': '" << DescrOf(t->dtype) << "', 'fortran_order': False, 'shape': (";
  for (int i = 0; i < t->ndim; ++i) {
    h << t->shape[i] << (t->ndim == 1 || i + 1 < t->ndim ? "," : "");
    if (i + 1 < t->ndim) h << " ";
  }
  h << "), }";
  std::string header = h.str();
  header.append(63 - (10 + header.size()) % 64, ' ');  // magic+len+header+\n: 64-byte aligned
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t hlen = static_cast<uint16_t>(header.size());
  f.write(reinterpret_cast<const char*>(&hlen), 2);
  f.write(header.data(), header.size());
  f.write(static_cast<const char*>(t->data) + t->byte_offset, NumBytes(t));
  if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    int repeat = 0;
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] == "--repeat") {
        repeat = std::stoi(args[i + 1]);
        args.erase(args.begin() + i, args.begin() + i + 2);
        break;
      }
    }
    if (args.size() < 3) {
      std::cerr << "usage: runner <model.so> <out_dir> <input0.npy> [...] [--repeat N]\n";
      return 2;
    }
    ffi::Module lib = ffi::Module::LoadFromFile(args[0]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // (device type, device id, allocator): CPU, 0, pooled (= 2, as the Python VM uses)
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    ffi::Function main_fn = vm->GetFunction("main").value();

    std::vector<Tensor> inputs;
    for (size_t i = 2; i < args.size(); ++i) inputs.push_back(LoadNpy(args[i]));
    std::vector<ffi::AnyView> packed(inputs.begin(), inputs.end());
    auto run = [&]() {
      ffi::Any ret;
      main_fn.CallPacked(packed.data(), static_cast<int32_t>(packed.size()), &ret);
      return ret;
    };
    ffi::Any ret = run();

    std::vector<Tensor> outputs;
    if (auto t = ret.as<Tensor>()) {
      outputs.push_back(*t);
    } else {
      for (const ffi::Any& o : ret.cast<ffi::Array<ffi::Any>>()) outputs.push_back(o.cast<Tensor>());
    }
    for (size_t i = 0; i < outputs.size(); ++i)
      SaveNpy(args[1] + "/output_" + std::to_string(i) + ".npy", outputs[i]);

    if (repeat > 0) {
      std::vector<double> ms;
      for (int r = 0; r < repeat; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        run();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      std::cout << "median_ms " << ms[ms.size() / 2] << " runs " << repeat << "\n";
    }
    std::cout << "wrote " << outputs.size() << " output(s) to " << args[1] << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "runner: error: " << e.what() << "\n";
    return 1;
  }
}
