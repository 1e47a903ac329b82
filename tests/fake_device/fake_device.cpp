// A strict fake accelerator for tests: PyTorch's PrivateUse1 device ("privateuseone:0"), backed
// by host memory, that fails like CUDA does when an op mixes its tensors with host tensors.
//
// Why: on the CPU every tensor is on the one device there is, so a tensor built on the host by
// mistake (a factory call without a device, a constant baked into a traced graph, a collective
// handed a host buffer) passes every CPU test and breaks the first GPU run. On this device it
// fails in CI, with CUDA's message.
//
// What it is (the PrivateUse1 route of PyTorch's out-of-tree backends):
// - an allocator (host memory, tagged privateuseone:0) and a device guard (one device, the
//   default stream only);
// - kernels for what must know the device: empty, empty_strided, copy_ / _copy_from (the only
//   ops that may take host and device tensors together, as on CUDA; non_blocking is accepted and
//   is synchronous), resize_;
// - a boxed fallback for every other op: it checks that every tensor argument is on this device
//   (a 0-dim host tensor is allowed, as CUDA allows CPU scalars), then runs the CPU kernel on
//   host views of the same memory (no copy) and hands the results back as device tensors.
//   Outputs that alias an input (views, in-place and out= ops, set_) keep sharing its storage.
//
// Load it into a process before any tensor is made: link it (tests) or LD_PRELOAD it
// (scripts/fake_device_check.sh runs dde_train and dde_encode_cache that way). Everything
// registers from static initialisers.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace dde_fake_device {
namespace {

constexpr c10::DeviceType kType = c10::DeviceType::PrivateUse1;
const c10::Device kDevice(kType, 0);

// ---- memory --------------------------------------------------------------------------------

// Device memory in use and its peak, in bytes: a memory meter for tests (e.g. ZeRO-1's buffers).
std::atomic<int64_t> g_bytes_in_use{0};
std::atomic<int64_t> g_peak_bytes{0};

struct Block {
  void* data;
  size_t bytes;
};

void free_block(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  g_bytes_in_use -= static_cast<int64_t>(block->bytes);
  c10::free_cpu(block->data);
  delete block;
}

class FakeAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* data = bytes == 0 ? nullptr : c10::alloc_cpu(bytes);
    const int64_t now = g_bytes_in_use += static_cast<int64_t>(bytes);
    int64_t peak = g_peak_bytes.load();
    while (now > peak && !g_peak_bytes.compare_exchange_weak(peak, now)) {
    }
    return {data, new Block{data, bytes}, &free_block, kDevice};
  }
  // No raw allocation: a block's size travels in its context.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count != 0) std::memcpy(dest, src, count);
  }
};
FakeAllocator g_allocator;
REGISTER_ALLOCATOR(kType, &g_allocator);

// ---- device guard and hooks ----------------------------------------------------------------

class FakeGuard final : public c10::impl::DeviceGuardImplInterface {
 public:
  c10::DeviceType type() const override { return kType; }
  c10::Device exchangeDevice(c10::Device d) const override {
    check(d);
    return kDevice;
  }
  c10::Device getDevice() const override { return kDevice; }
  void setDevice(c10::Device d) const override { check(d); }
  void uncheckedSetDevice(c10::Device /*d*/) const noexcept override {}
  c10::Stream getStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::DEFAULT, d);
  }
  c10::Stream getDefaultStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::DEFAULT, d);
  }
  c10::Stream exchangeStream(c10::Stream s) const override {
    return c10::Stream(c10::Stream::DEFAULT, s.device());
  }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
  bool queryStream(const c10::Stream& /*s*/) const override { return true; }
  void synchronizeStream(const c10::Stream& /*s*/) const override {}
  void synchronizeDevice(const c10::DeviceIndex /*i*/) const override {}
  void record(void** /*event*/, const c10::Stream& /*s*/, const c10::DeviceIndex /*i*/,
              const c10::EventFlag /*f*/) const override {}
  void block(void* /*event*/, const c10::Stream& /*s*/) const override {}
  bool queryEvent(void* /*event*/) const override { return true; }
  void destroyEvent(void* /*event*/, const c10::DeviceIndex /*i*/) const noexcept override {}

 private:
  static void check(c10::Device d) {
    TORCH_CHECK(d.type() == kType && (!d.has_index() || d.index() == 0),
                "the fake device has one device, privateuseone:0; got ", d);
  }
};
C10_REGISTER_GUARD_IMPL(PrivateUse1, FakeGuard);

class FakeHooks final : public at::PrivateUse1HooksInterface {
 public:
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex /*i*/) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  // Random ops run the CPU kernels, which draw from the CPU generator.
  const at::Generator& getDefaultGenerator(c10::DeviceIndex /*i*/) const override {
    return at::detail::getDefaultCPUGenerator();
  }
  at::Device getDeviceFromPtr(void* /*data*/) const override { return kDevice; }
  // A non-blocking copy to the host asks the accelerator for page-locked memory; ours is host
  // memory already, so plain host memory stands in (and the copy is synchronous).
  at::Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }
  bool isPinnedPtr(const void* /*data*/) const override { return false; }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t bytes) const override;
};

// ---- host views of device memory and back --------------------------------------------------

void delete_storage_ref(void* ctx) { delete static_cast<c10::Storage*>(ctx); }

// A storage on `device` over `source`'s memory; it keeps `source` alive.
c10::Storage storage_view(const c10::Storage& source, c10::Device device,
                          c10::Allocator* allocator) {
  auto* keep = new c10::Storage(source);
  c10::DataPtr data(source.mutable_data(), keep, &delete_storage_ref, device);
  return {c10::Storage::use_byte_size_t(), source.nbytes(), std::move(data), allocator,
          /*resizable=*/true};
}

at::Tensor tensor_on(const c10::Storage& storage, c10::DispatchKey key, const at::Tensor& like) {
  at::Tensor out = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(storage),
                                                            c10::DispatchKeySet(key), like.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides(),
                                                   like.storage_offset());
  return out;
}

void FakeHooks::resizePrivateUse1Bytes(const c10::Storage& storage, size_t bytes) const {
  c10::StorageImpl* impl = storage.unsafeGetStorageImpl();
  TORCH_CHECK(impl->resizable(), "the fake device: storage is not resizable");
  c10::DataPtr fresh = g_allocator.allocate(bytes);
  const size_t keep = std::min(bytes, impl->nbytes());
  if (keep != 0) std::memcpy(fresh.get(), impl->data(), keep);
  impl->set_data_ptr_noswap(std::move(fresh));
  impl->set_nbytes(bytes);
}

// The host views of one op call, and the way back to device tensors.
class HostViews {
 public:
  at::Tensor to_host(const at::Tensor& t) {
    c10::StorageImpl* key = t.storage().unsafeGetStorageImpl();
    auto it = host_of_.find(key);
    if (it == host_of_.end()) {
      c10::Storage host = storage_view(t.storage(), c10::Device(c10::kCPU), c10::GetCPUAllocator());
      device_of_.emplace(host.unsafeGetStorageImpl(), t.storage());
      it = host_of_.emplace(key, std::move(host)).first;
    }
    at::Tensor host = tensor_on(it->second, c10::DispatchKey::CPU, t);
    original_.emplace(host.unsafeGetTensorImpl(), t);
    return host;
  }

  // A host result as a device tensor: the argument it is (in-place ops), a view of an
  // argument's storage, or the result's own memory moved under the device tag.
  at::Tensor to_device(const at::Tensor& host) {
    if (!host.defined() || host.device().type() != c10::kCPU) return host;
    if (auto it = original_.find(host.unsafeGetTensorImpl()); it != original_.end()) {
      return it->second;
    }
    return tensor_on(device_storage(host.storage()), c10::DispatchKey::PrivateUse1, host);
  }

  // After the op: a mutated argument whose host view was resized or re-pointed (out= ops,
  // set_) takes the new memory and geometry.
  void write_back(const at::Tensor& device_arg, const at::Tensor& host_view) {
    c10::TensorImpl* dev = device_arg.unsafeGetTensorImpl();
    c10::StorageImpl* host_storage = host_view.storage().unsafeGetStorageImpl();
    c10::StorageImpl* dev_storage = device_arg.storage().unsafeGetStorageImpl();
    const auto viewed = host_of_.find(dev_storage);
    const bool same_storage =
        viewed != host_of_.end() && viewed->second.unsafeGetStorageImpl() == host_storage;
    if (!same_storage) {
      dev->set_storage_keep_dtype(device_storage(host_view.storage()));
    } else if (host_storage->data() != dev_storage->data() ||
               host_storage->nbytes() != dev_storage->nbytes()) {
      // Resized on the host: the new block becomes the device storage's.
      c10::DataPtr moved = host_storage->set_data_ptr(c10::DataPtr());
      moved.unsafe_set_device(kDevice);
      dev_storage->set_data_ptr_noswap(std::move(moved));
      dev_storage->set_nbytes(host_storage->nbytes());
      host_storage->set_data_ptr_noswap(
          c10::DataPtr(dev_storage->mutable_data(), c10::Device(c10::kCPU)));
    }
    if (dev->sizes() != host_view.sizes() || dev->strides() != host_view.strides() ||
        dev->storage_offset() != host_view.storage_offset()) {
      dev->set_sizes_and_strides(host_view.sizes(), host_view.strides(),
                                 host_view.storage_offset());
    }
  }

 private:
  c10::Storage device_storage(const c10::Storage& host) {
    c10::StorageImpl* key = host.unsafeGetStorageImpl();
    auto it = device_of_.find(key);
    if (it == device_of_.end()) {
      it = device_of_.emplace(key, storage_view(host, kDevice, &g_allocator)).first;
    }
    return it->second;
  }

  std::unordered_map<c10::StorageImpl*, c10::Storage> host_of_;    // device storage -> host view
  std::unordered_map<c10::StorageImpl*, c10::Storage> device_of_;  // host storage -> device
  std::unordered_map<c10::TensorImpl*, at::Tensor> original_;      // host view -> argument
};

// ---- the device check ----------------------------------------------------------------------

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.device() << " " << t.scalar_type() << t.sizes();
  return s.str();
}

void check_tensor(const c10::OperatorHandle& op, const at::Tensor& t, size_t arg) {
  if (!t.defined() || t.device() == kDevice) return;
  if (t.device().is_cpu() && t.dim() == 0) return;  // a host scalar, as CUDA allows
  TORCH_CHECK(false, "Expected all tensors to be on the same device, but found at least two ",
              "devices, ", kDevice, " and ", t.device(), "! (fake device: ", op.schema().name(),
              " argument ", arg, " is a ", describe(t), ")");
}

template <typename F>
void for_each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorVector()) f(t);
  } else if (v.isList()) {
    for (const c10::IValue& e : v.toListRef()) {
      if (e.isTensor()) f(e.toTensor());
    }
  }
}

// ---- the fallback --------------------------------------------------------------------------

c10::IValue map_tensors(const c10::IValue& v,
                        const std::function<at::Tensor(const at::Tensor&)>& f) {
  if (v.isTensor()) return f(v.toTensor());
  if (v.isTensorList()) {
    c10::List<at::Tensor> out;
    for (const at::Tensor& t : v.toTensorVector()) out.push_back(f(t));
    return out;
  }
  if (v.isList()) {
    const c10::List<c10::IValue> in = v.toList();
    bool has_tensor = false;
    for (const c10::IValue& e : in) has_tensor = has_tensor || e.isTensor();
    if (!has_tensor) return v;
    // Tensor?[] (index, index_put_): a list of optional tensors.
    c10::List<std::optional<at::Tensor>> out;
    for (const c10::IValue& e : in) {
      out.push_back(e.isTensor() ? std::optional<at::Tensor>(f(e.toTensor())) : std::nullopt);
    }
    return out;
  }
  return v;
}

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet /*ks*/, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t n_args = schema.arguments().size();
  const size_t first = stack->size() - n_args;
  for (size_t i = 0; i < n_args; ++i) {
    for_each_tensor((*stack)[first + i], [&](const at::Tensor& t) { check_tensor(op, t, i); });
  }
  HostViews views;
  const auto on_host = [&](const at::Tensor& t) {
    return t.defined() && t.device() == kDevice ? views.to_host(t) : t;
  };
  std::vector<c10::IValue> device_args((stack->begin() + static_cast<std::ptrdiff_t>(first)),
                                       stack->end());
  for (size_t i = 0; i < n_args; ++i) (*stack)[first + i] = map_tensors(device_args[i], on_host);
  std::vector<c10::IValue> host_args((stack->begin() + static_cast<std::ptrdiff_t>(first)),
                                     stack->end());

  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);

  for (size_t i = 0; i < n_args; ++i) {
    const c10::AliasInfo* alias = schema.arguments()[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    if (device_args[i].isTensor() && host_args[i].isTensor()) {
      const at::Tensor& dev = device_args[i].toTensor();
      if (dev.defined() && dev.device() == kDevice) views.write_back(dev, host_args[i].toTensor());
    } else if (device_args[i].isTensorList() && host_args[i].isTensorList()) {
      const std::vector<at::Tensor> devs = device_args[i].toTensorVector();
      const std::vector<at::Tensor> hosts = host_args[i].toTensorVector();
      for (size_t k = 0; k < devs.size(); ++k) {
        if (devs[k].defined() && devs[k].device() == kDevice) views.write_back(devs[k], hosts[k]);
      }
    }
  }
  const size_t n_returns = schema.returns().size();
  const size_t returns = stack->size() - n_returns;
  for (size_t i = 0; i < n_returns; ++i) {
    (*stack)[returns + i] =
        map_tensors((*stack)[returns + i], [&](const at::Tensor& t) { return views.to_device(t); });
  }
}

// ---- kernels that must know the device -----------------------------------------------------

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout> /*layout*/,
                               std::optional<c10::Device> /*device*/,
                               std::optional<bool> /*pin_memory*/,
                               std::optional<c10::MemoryFormat> memory_format) {
  return at::detail::empty_generic(size, &g_allocator,
                                   c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride,
                         std::optional<c10::ScalarType> dtype,
                         std::optional<c10::Layout> /*layout*/,
                         std::optional<c10::Device> /*device*/,
                         std::optional<bool> /*pin_memory*/) {
  return at::detail::empty_strided_generic(size, stride, &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

// Host <-> device and device <-> device copies (the only mixing allowed, as on CUDA).
at::Tensor copy_between(const at::Tensor& src, const at::Tensor& dst) {
  for (const at::Tensor* t : {&src, &dst}) {
    TORCH_CHECK(t->device() == kDevice || t->device().is_cpu(),
                "the fake device copies between privateuseone:0 and the CPU only; got ",
                t->device());
  }
  HostViews views;
  at::Tensor host_dst = dst.device() == kDevice ? views.to_host(dst) : dst;
  const at::Tensor host_src = src.device() == kDevice ? views.to_host(src) : src;
  host_dst.copy_(host_src);
  return dst;
}

at::Tensor& copy_(at::Tensor& self, const at::Tensor& src, bool /*non_blocking*/) {
  copy_between(src, self);
  return self;
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool /*non_blocking*/) {
  return copy_between(self, dst);
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  dst.resize_(self.sizes());
  return copy_between(self, dst);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          std::optional<c10::MemoryFormat> memory_format) {
  c10::TensorImpl* impl = self.unsafeGetTensorImpl();
  impl->set_sizes_contiguous(size);
  if (memory_format) impl->empty_tensor_restride(*memory_format);
  const size_t need =
      at::detail::computeStorageNbytes(self.sizes(), self.strides(), self.dtype().itemsize(),
                                       static_cast<size_t>(self.storage_offset()));
  if (need > self.storage().nbytes()) {
    at::detail::getPrivateUse1Hooks().resizePrivateUse1Bytes(self.storage(), need);
  }
  return self;
}

FakeHooks g_hooks;
// Registered as the process's accelerator (c10's getAccelerator prefers a registered PrivateUse1
// backend over CUDA, which a CUDA build would otherwise report, e.g. for autograd's streams).
struct RegisterHooks {
  RegisterHooks() {
    c10::register_privateuse1_backend("privateuseone");
    at::RegisterPrivateUse1HooksInterface(&g_hooks);
  }
} g_register_hooks;

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("copy_", copy_);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("resize_", resize_);
  // Views: the generic TensorImpl kernels (no data is touched).
  m.impl("view", at::native::view);
  m.impl("as_strided", at::native::as_strided_tensorimpl);
  m.impl("set_.source_Storage", at::native::set_);
  m.impl("set_.source_Storage_storage_offset", at::native::set_storage_cpu_);
  // Convolutions: ATen's composite picks the backend from the device type and would call
  // convolution_overrideable for ours; run the whole op (and its backward) as the CPU does.
  m.impl("convolution", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("convolution_backward", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  // Normalisations: without a kernel of ours ATen would pick its composite (math) versions, which
  // fail on channels-last inputs that the CPU and CUDA kernels take; run the CPU kernels instead.
  // (Only ops with their own autograd formula: a kernel for a composite op would hide its
  // decomposition from autograd.)
  for (const char* op : {"native_group_norm", "native_group_norm_backward", "native_layer_norm",
                         "native_layer_norm_backward"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&fallback>());
  }
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

}  // namespace dde_fake_device

// Lets a test ask whether the library is loaded (dlsym) without including it.
extern "C" int dde_fake_device_loaded() { return 1; }
// The device memory meter: bytes in use now, the peak since the last reset (which sets it to now).
extern "C" int64_t dde_fake_device_bytes_in_use() { return dde_fake_device::g_bytes_in_use.load(); }
extern "C" int64_t dde_fake_device_peak_bytes() { return dde_fake_device::g_peak_bytes.load(); }
extern "C" void dde_fake_device_reset_peak() {
  dde_fake_device::g_peak_bytes = dde_fake_device::g_bytes_in_use.load();
}
