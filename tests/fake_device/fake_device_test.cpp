// The fake accelerator behaves like CUDA where it matters to dde
// (tests/fake_device/fake_device.cpp), and the parts of dde that move tensors between devices work
// on it.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>

#include "dde/dist/communicator.hpp"
#include "dde/dist/device.hpp"
#include "dde/models/torchscript.hpp"
#include "dde/train/data_parallel_optimizer.hpp"
#include "dde/util/error.hpp"
#include "util/expect_error.hpp"

extern "C" int dde_fake_device_loaded();
extern "C" int64_t dde_fake_device_bytes_in_use();
extern "C" int64_t dde_fake_device_peak_bytes();
extern "C" void dde_fake_device_reset_peak();

namespace {

const torch::Device kFake(c10::DeviceType::PrivateUse1, 0);

torch::Tensor on_fake(const torch::Tensor& t) { return t.to(kFake); }

// f fails as CUDA fails on a host tensor in a device op (TorchScript wraps it in runtime_error).
void expect_device_error(const std::function<void()>& f) {
  try {
    f();
    ADD_FAILURE() << "a host tensor mixed into a device op did not fail";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("Expected all tensors to be on the same device"),
              std::string::npos)
        << e.what();
  }
}

TEST(FakeDevice, IsLoadedAndSelectable) {
  ASSERT_EQ(dde_fake_device_loaded(), 1);
  EXPECT_EQ(dde::dist::select_device("privateuseone", /*local_rank=*/3), kFake);
  const torch::Tensor x = torch::ones({2}, torch::TensorOptions().device(kFake));
  EXPECT_EQ(x.device(), kFake);
  EXPECT_FALSE(x.is_cpu());
  EXPECT_FALSE(x.is_cuda());
}

TEST(FakeDevice, MixingWithAHostTensorFailsAsOnCuda) {
  const torch::Tensor x = on_fake(torch::arange(4, torch::kFloat32));
  const torch::Tensor host = torch::ones({4});
  for (const auto& op : std::vector<std::function<torch::Tensor()>>{
           [&] { return x + host; },
           [&] { return host * x; },
           [&] {
             return torch::cat({x, host});
           },
           [&] {
             return x.index_select(0, torch::tensor({0, 1}));
           },
           [&] { return torch::where(host > 0, x, x); },
       }) {
    expect_device_error([&] { (void)op(); });
  }
}

TEST(FakeDevice, AHostScalarIsAllowedAsOnCuda) {
  const torch::Tensor x = on_fake(torch::arange(4, torch::kFloat32));
  const torch::Tensor y = x * torch::tensor(2.0) + torch::scalar_tensor(1.0);
  EXPECT_EQ(y.device(), kFake);
  EXPECT_TRUE(torch::equal(y.cpu(), torch::arange(4, torch::kFloat32) * 2 + 1));
}

TEST(FakeDevice, CopiesBothWaysWithAndWithoutBlocking) {
  const torch::Tensor host = torch::randn({3, 5});
  for (const bool non_blocking : {false, true}) {
    const torch::Tensor dev = host.to(kFake, non_blocking);
    EXPECT_EQ(dev.device(), kFake);
    const torch::Tensor back = dev.to(torch::kCPU, non_blocking);
    EXPECT_TRUE(back.is_cpu());
    EXPECT_TRUE(torch::equal(back, host));
    torch::Tensor into = torch::empty({3, 5}, torch::TensorOptions().device(kFake));
    into.copy_(host.t().contiguous().t(), non_blocking);  // strided source
    EXPECT_TRUE(torch::equal(into.cpu(), host));
  }
  const torch::Tensor as_double = host.to(kFake, torch::kFloat64);
  EXPECT_EQ(as_double.scalar_type(), torch::kFloat64);
  EXPECT_TRUE(torch::allclose(as_double.cpu(), host.to(torch::kFloat64)));
}

TEST(FakeDevice, ViewsInPlaceAndOutOpsShareMemory) {
  torch::Tensor x = on_fake(torch::zeros({4, 4}));
  torch::Tensor row = x[1];
  row.add_(1.0);
  x.slice(1, 2, 4).mul_(0.0).add_(5.0);
  const torch::Tensor expected = [] {
    torch::Tensor e = torch::zeros({4, 4});
    e[1] += 1.0;
    e.slice(1, 2, 4).fill_(5.0);
    return e;
  }();
  EXPECT_TRUE(torch::equal(x.cpu(), expected));
  EXPECT_TRUE(row.is_alias_of(x));
  // An out= op that resizes its output.
  torch::Tensor out = torch::empty({0}, torch::TensorOptions().device(kFake));
  torch::add_out(out, x, x);
  EXPECT_EQ(out.sizes(), x.sizes());
  EXPECT_TRUE(torch::equal(out.cpu(), expected * 2));
  torch::Tensor grown = on_fake(torch::ones({2}));
  grown.resize_({3, 3});
  grown.fill_(2.0);
  EXPECT_TRUE(torch::equal(grown.cpu(), torch::full({3, 3}, 2.0)));
}

TEST(FakeDevice, AutogradAndRandomness) {
  torch::Tensor w = on_fake(torch::randn({3, 2})).requires_grad_(true);
  const torch::Tensor x = on_fake(torch::randn({4, 3}));
  const torch::Tensor loss = torch::mm(x, w).pow(2).mean();
  loss.backward();
  ASSERT_TRUE(w.grad().defined());
  EXPECT_EQ(w.grad().device(), kFake);
  const torch::Tensor expected =
      torch::mm(x.cpu().t(), 2 * torch::mm(x.cpu(), w.detach().cpu())) / 8;
  EXPECT_TRUE(torch::allclose(w.grad().cpu(), expected, 1e-5, 1e-6));
  const torch::Tensor r = torch::randn({8}, torch::TensorOptions().device(kFake));
  EXPECT_EQ(r.device(), kFake);
  EXPECT_TRUE(std::isfinite(r[0].item<float>()));  // .item() reads the device from the host
}

// TorchScript archives load onto it (as dde loads its exports: torch::jit::load with the device).
TEST(FakeDevice, TorchScriptModulesLoadOntoIt) {
  torch::jit::Module m("m");
  m.register_parameter("w", torch::ones({3}) * 2, /*is_buffer=*/false);
  m.define(R"(
    def forward(self, x):
        return x * self.w
  )");
  const std::string path = ::testing::TempDir() + "/fake_device_module.pt";
  m.save(path);
  torch::jit::Module loaded = torch::jit::load(path, kFake);
  for (const auto& p : loaded.parameters()) EXPECT_EQ(p.device(), kFake);
  const torch::Tensor y = loaded.forward({on_fake(torch::ones({3}))}).toTensor();
  EXPECT_EQ(y.device(), kFake);
  EXPECT_TRUE(torch::equal(y.cpu(), torch::full({3}, 2.0)));
  // A host input to a device module fails, as on CUDA.
  expect_device_error([&] { (void)loaded.forward({torch::ones({3})}); });
}

// A traced graph that bakes the host in (as torch.jit.trace records `device=x.device`) fails on
// the device: the reason exported graphs must hold no Device constant.
TEST(FakeDevice, ATorchScriptHostConstantFails) {
  const std::string dir = ::testing::TempDir();
  torch::jit::Module m("m");
  m.define(R"(
    def forward(self, x):
        return x + torch.ones(x.size(0), device=torch.device("cpu"))
  )");
  m.to(kFake);
  expect_device_error([&] { (void)m.forward({on_fake(torch::ones({3}))}); });
  torch::jit::Module ok("ok");
  ok.define(R"(
    def forward(self, x):
        return x + torch.ones(x.size(0), device=x.device)
  )");
  EXPECT_EQ(ok.forward({on_fake(torch::ones({3}))}).toTensor().device(), kFake);
}

// ---- the communicator treats it as a device, not as the host -----------------------------

std::unique_ptr<dde::dist::Communicator> gloo_world_of_one() {
  dde::dist::DistEnvironment env;
  env.source = "test";
  env.master_port = 0;
  return dde::dist::Communicator::create(env, "gloo", kFake, std::chrono::seconds(30),
                                         /*force_process_group=*/true);
}

TEST(FakeDeviceCommunicator, RefusesHostTensorsInAWorldOfOneToo) {
  const auto single = dde::dist::Communicator::create(dde::dist::DistEnvironment{}, "auto", kFake,
                                                      std::chrono::seconds(30));
  std::vector<torch::Tensor> host{torch::zeros({2}, torch::kFloat64)};
  expect_error_mentions([&] { single->all_reduce_sum(host, 1 << 20); },
                        {"tensor on the wrong device", "privateuseone:0", "cpu"});
  expect_error_mentions(
      [&] {
        (void)single->all_gather(torch::zeros({2, 3}, torch::kInt64));
      },
      {"tensor on the wrong device", "all_gather"});
  const auto gloo = gloo_world_of_one();
  expect_error_mentions([&] { gloo->all_reduce_sum(host, 1 << 20); },
                        {"tensor on the wrong device", "gloo"});
}

TEST(FakeDeviceCommunicator, GlooStagesThroughTheHost) {
  const auto comm = gloo_world_of_one();
  EXPECT_EQ(comm->backend(), "gloo");
  std::vector<torch::Tensor> tensors{on_fake(torch::tensor({1.5, -2.0}, torch::kFloat64)),
                                     on_fake(torch::arange(6, torch::kFloat32).view({2, 3}))};
  const torch::Tensor first = tensors[0].cpu();
  comm->all_reduce_sum(tensors, /*bucket_bytes=*/8);
  EXPECT_EQ(tensors[0].device(), kFake);
  EXPECT_TRUE(torch::equal(tensors[0].cpu(), first));
  const torch::Tensor rows = on_fake(torch::rand({3, 4}, torch::kFloat64));
  const torch::Tensor gathered = comm->all_gather(rows);
  EXPECT_EQ(gathered.device(), kFake);
  EXPECT_TRUE(torch::equal(gathered.cpu(), rows.cpu()));
  const torch::Tensor flat = on_fake(torch::arange(4, torch::kFloat32));
  const torch::Tensor shard = comm->reduce_scatter_sum(flat);
  EXPECT_EQ(shard.device(), kFake);
  EXPECT_TRUE(torch::equal(comm->all_gather_flat(shard).cpu(), flat.cpu()));
  std::vector<torch::Tensor> weights{on_fake(torch::ones({4}))};
  comm->broadcast(weights, /*root=*/0);
  EXPECT_EQ(weights[0].device(), kFake);
  EXPECT_TRUE(comm->any(true));
  EXPECT_FALSE(comm->any(false));
}

// ZeRO-1 moves gradients and weights in buckets: beyond the optimizer state and its own summed
// shard, a step allocates about two buckets, not model-sized flat buffers (measured with the fake
// device's allocator).
TEST(FakeDeviceZero1, BucketsBoundTheStepsExtraMemory) {
  const auto comm = gloo_world_of_one();
  dde::train::NamedTensors params;
  int64_t param_bytes = 0;
  for (int i = 0; i < 16; ++i) {
    torch::Tensor p = on_fake(torch::randn({128, 128})).requires_grad_(true);
    param_bytes += static_cast<int64_t>(p.nbytes());
    params.emplace_back("p" + std::to_string(i), p);
  }
  dde::config::OptimConfig optim;
  constexpr int64_t kBucketBytes = 64 << 10;
  auto optimizer =
      dde::train::DataParallelOptimizer::create(params, optim, /*shard=*/true, *comm, kBucketBytes);
  const auto fill_grads = [&] {
    for (auto& [name, p] : params) p.mutable_grad() = torch::ones_like(p);
  };
  // Step 1 allocates the optimizer state and the shard; step 2 is the steady state.
  fill_grads();
  optimizer->reduce_gradients();
  optimizer->step(1e-3);
  optimizer->zero_grad();
  fill_grads();
  const int64_t before = dde_fake_device_bytes_in_use();
  dde_fake_device_reset_peak();
  optimizer->reduce_gradients();
  optimizer->clip_grad_norm(1.0);
  optimizer->step(1e-3);
  optimizer->zero_grad();
  const int64_t extra = dde_fake_device_peak_bytes() - before;
  EXPECT_GT(extra, 0);
  // A model-sized flat buffer (the unbucketed reduce-scatter or all-gather) would exceed this.
  EXPECT_LT(extra, param_bytes / 2) << "extra peak bytes " << extra << " of " << param_bytes;
  for (const auto& [name, p] : params) EXPECT_EQ(p.device(), kFake);
}

}  // namespace
