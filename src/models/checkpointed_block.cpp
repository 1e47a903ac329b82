#include "checkpointed_block.hpp"

#include <ATen/autocast_mode.h>

#include <mutex>
#include <optional>

namespace dde::models::detail {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr c10::DeviceType kAutocastDevices[] = {c10::DeviceType::CPU, c10::DeviceType::CUDA};

// The default generators that a block's ops could draw from: the CPU's and, for a CUDA block,
// its device's (torch.utils.checkpoint's preserve_rng_state).
struct RngState {
  torch::Tensor cpu;
  std::optional<c10::Device> cuda_device;
  torch::Tensor cuda;

  static RngState capture(const c10::Device& device) {
    RngState s;
    s.cpu = at::globalContext().defaultGenerator(c10::DeviceType::CPU).get_state();
    if (device.is_cuda()) {
      s.cuda_device = device;
      s.cuda = at::globalContext().defaultGenerator(device).get_state();
    }
    return s;
  }
  void restore() const {
    set(c10::Device(c10::DeviceType::CPU), cpu);
    if (cuda_device) set(*cuda_device, cuda);
  }
  static void set(const c10::Device& device, const torch::Tensor& state) {
    at::Generator generator = at::globalContext().defaultGenerator(device);
    const std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state);
  }
};

c10::Device first_device(at::TensorList inputs) {
  for (const torch::Tensor& x : inputs) {
    if (x.defined()) return x.device();
  }
  return c10::Device(c10::DeviceType::CPU);
}

class CheckpointedBlock : public torch::autograd::Function<CheckpointedBlock> {
 public:
  // Runs with grad mode off (Function::apply does that).
  // `prepare`: the address of a BlockPrepare that outlives backward, or 0.
  static variable_list forward(AutogradContext* ctx, const c10::IValue& module,
                               at::TensorList inputs, at::TensorList params, int64_t prepare) {
    const RngState rng = RngState::capture(first_device(inputs));
    ctx->saved_data["rng_cpu"] = rng.cpu;
    if (rng.cuda_device) {
      ctx->saved_data["rng_cuda"] = rng.cuda;
      ctx->saved_data["rng_cuda_index"] = static_cast<int64_t>(rng.cuda_device->index());
    }
    for (c10::DeviceType type : kAutocastDevices) {
      const std::string key = c10::DeviceTypeName(type, /*lower_case=*/true);
      ctx->saved_data["autocast_" + key] = at::autocast::is_autocast_enabled(type);
      ctx->saved_data["autocast_dtype_" + key] = at::autocast::get_autocast_dtype(type);
    }
    c10::List<bool> needs_grad;
    for (const torch::Tensor& x : inputs) needs_grad.push_back(x.requires_grad());
    ctx->saved_data["needs_grad"] = needs_grad;
    ctx->saved_data["module"] = module;
    // The tensors that get gradients, held by reference (leaves: no version check applies).
    ctx->saved_data["params"] = c10::List<at::Tensor>(params.vec());
    ctx->saved_data["prepare"] = prepare;
    ctx->save_for_backward(inputs.vec());

    torch::jit::Module block(module.toObject());
    std::vector<torch::Tensor> outputs;
    {
      const PrepareScope prepared(prepare_at(prepare));
      outputs = forward_tensors(block, inputs.vec());
    }
    // Each output must be its own tensor: diffusers' down blocks return h both as the block
    // output and as its last skip, and a custom Function cannot return one tensor twice.
    for (size_t i = 0; i < outputs.size(); ++i) {
      bool shared = false;
      for (size_t j = 0; j < i; ++j) shared = shared || outputs[i].is_same(outputs[j]);
      for (const torch::Tensor& x : inputs) shared = shared || outputs[i].is_same(x);
      if (shared) outputs[i] = outputs[i].clone();
    }
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const c10::List<bool> needs_grad = ctx->saved_data["needs_grad"].toBoolList();
    std::vector<torch::Tensor> inputs;
    for (size_t i = 0; i < saved.size(); ++i) {
      torch::Tensor x = saved[i].detach();
      if (needs_grad.get(i)) x.requires_grad_(true);
      inputs.push_back(x);
    }
    torch::jit::Module block(ctx->saved_data["module"].toObject());
    std::vector<torch::Tensor> params;
    for (const at::Tensor& p : ctx->saved_data["params"].toTensorList()) params.push_back(p);
    for (const torch::Tensor& p : params) {
      TORCH_CHECK(p.requires_grad(),
                  "checkpointed block: a parameter stopped requiring grad before backward");
    }

    std::vector<torch::Tensor> outputs = recompute(ctx, block, inputs);

    std::vector<torch::Tensor> roots;
    std::vector<torch::Tensor> root_grads;
    for (size_t i = 0; i < outputs.size() && i < grad_outputs.size(); ++i) {
      if (grad_outputs[i].defined() && outputs[i].requires_grad()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grad_outputs[i]);
      }
    }
    std::vector<torch::Tensor> wrt;
    for (const torch::Tensor& x : inputs) {
      if (x.requires_grad()) wrt.push_back(x);
    }
    wrt.insert(wrt.end(), params.begin(), params.end());
    variable_list grads;
    if (!roots.empty() && !wrt.empty()) {
      grads = torch::autograd::grad(roots, wrt, root_grads, /*retain_graph=*/false,
                                    /*create_graph=*/false, /*allow_unused=*/true);
    } else {
      grads.resize(wrt.size());
    }
    // One gradient per forward argument: none for the module, then the inputs, then params,
    // then none for `prepare`.
    variable_list result{torch::Tensor()};
    size_t k = 0;
    for (const torch::Tensor& x : inputs)
      result.push_back(x.requires_grad() ? grads[k++] : torch::Tensor());
    for (size_t p = 0; p < params.size(); ++p) result.push_back(grads[k++]);
    result.push_back(torch::Tensor());
    return result;
  }

 private:
  // The BlockPrepare whose address forward() saved (0: none).
  static const BlockPrepare* prepare_at(int64_t address) {
    return reinterpret_cast<const BlockPrepare*>(address);  // NOLINT(performance-no-int-to-ptr)
  }

  // Re-runs the block with grad on, under the RNG and autocast state of the forward.
  static std::vector<torch::Tensor> recompute(AutogradContext* ctx, torch::jit::Module& block,
                                              const std::vector<torch::Tensor>& inputs) {
    const c10::Device device = first_device(inputs);
    const RngState current = RngState::capture(device);
    RngState forward_rng;
    forward_rng.cpu = ctx->saved_data["rng_cpu"].toTensor();
    if (ctx->saved_data.count("rng_cuda") != 0) {
      forward_rng.cuda_device =
          c10::Device(c10::DeviceType::CUDA,
                      static_cast<c10::DeviceIndex>(ctx->saved_data["rng_cuda_index"].toInt()));
      forward_rng.cuda = ctx->saved_data["rng_cuda"].toTensor();
    }
    forward_rng.restore();

    bool any_autocast = false;
    std::vector<std::pair<bool, c10::ScalarType>> previous;
    for (c10::DeviceType type : kAutocastDevices) {
      const std::string key = c10::DeviceTypeName(type, /*lower_case=*/true);
      previous.emplace_back(at::autocast::is_autocast_enabled(type),
                            at::autocast::get_autocast_dtype(type));
      const bool enabled = ctx->saved_data["autocast_" + key].toBool();
      any_autocast = any_autocast || enabled;
      at::autocast::set_autocast_enabled(type, enabled);
      at::autocast::set_autocast_dtype(type,
                                       ctx->saved_data["autocast_dtype_" + key].toScalarType());
    }

    std::vector<torch::Tensor> outputs;
    {
      torch::AutoGradMode grad_on(true);
      const PrepareScope prepared(prepare_at(ctx->saved_data["prepare"].toInt()));
      outputs = forward_tensors(block, inputs);
    }

    for (size_t i = 0; i < std::size(kAutocastDevices); ++i) {
      at::autocast::set_autocast_enabled(kAutocastDevices[i], previous[i].first);
      at::autocast::set_autocast_dtype(kAutocastDevices[i], previous[i].second);
    }
    if (any_autocast) at::autocast::clear_cache();  // the recompute's casts of the weights
    current.restore();
    return outputs;
  }
};

}  // namespace

std::vector<torch::Tensor> forward_tensors(torch::jit::Module& module,
                                           const std::vector<torch::Tensor>& inputs) {
  std::vector<torch::jit::IValue> args(inputs.begin(), inputs.end());
  const c10::IValue out = module.forward(args);
  if (out.isTensor()) return {out.toTensor()};
  std::vector<torch::Tensor> tensors;
  for (const c10::IValue& e : out.toTupleRef().elements()) tensors.push_back(e.toTensor());
  return tensors;
}

std::vector<torch::Tensor> forward_checkpointed(torch::jit::Module& module,
                                                const std::vector<torch::Tensor>& inputs,
                                                const std::vector<torch::Tensor>& params,
                                                const BlockPrepare* prepare) {
  return CheckpointedBlock::apply(c10::IValue(module._ivalue()), at::TensorList(inputs),
                                  at::TensorList(params),
                                  static_cast<int64_t>(reinterpret_cast<intptr_t>(prepare)));
}

}  // namespace dde::models::detail
