#include "dde/train/evaluator.hpp"

#include <fmt/format.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <utility>

#include "dde/data/held_out_pairs.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/pairs/caption_tokenizers.hpp"
#include "dde/pairs/pair_path.hpp"
#include "dde/train/stop_signal.hpp"
#include "dde/train/test_seam.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"
#include "dde/util/seed.hpp"

namespace dde::train {
namespace {

constexpr int64_t kReduceBucketBytes = 1 << 20;

// One micro-batch of held-out pairs, encoded once (CPU tensors).
struct EncodedPairs {
  torch::Tensor pair_ids;     // [B] int64
  torch::Tensor latents;      // [2B, C, h, w]: winners then losers, x scaling factor
  models::Conditioning cond;  // for [x_w; x_l] (2B rows)
  torch::Tensor ref_errors;   // [nb, 2, B] float32: reference e[ref, w|l] per bin
};

models::Conditioning conditioning_to(const models::Conditioning& c, const torch::Device& device,
                                     int64_t repeats) {
  models::Conditioning out;
  const auto tile = [&](const torch::Tensor& x) {
    if (!x.defined()) return x;
    std::vector<int64_t> reps(static_cast<size_t>(x.dim()), 1);
    reps[0] = repeats;
    return x.to(device).repeat(reps);
  };
  out.text = tile(c.text);
  out.pooled = tile(c.pooled);
  out.time_ids = tile(c.time_ids);
  return out;
}

// The record of an evaluation from the all-reduced sums (host) [7, nb]: means per bin and over
// all (the evaluated pairs: bad ones are left out).
EvalResult result_from_sums(const torch::Tensor& sums, int64_t step,
                            const std::vector<int64_t>& bins) {
  EvalResult r;
  r.step = step;
  r.pairs = static_cast<int64_t>(sums[3][0].item<double>());
  r.t_bins = bins;
  const torch::Tensor by_t = sums.slice(0, 0, 3) / sums[3];  // [3, nb]
  const torch::Tensor overall = sums.slice(0, 0, 3).sum(1) / sums[3].sum();
  const torch::Tensor diagnostics = sums.slice(0, 4, 7) / sums[3];  // [3, nb]
  for (int64_t j = 0; j < static_cast<int64_t>(bins.size()); ++j) {
    r.misranked_by_t.push_back(diagnostics[0][j].item<double>());
    r.credit_by_t.push_back(diagnostics[1][j].item<double>());
    r.z_by_t.push_back(diagnostics[2][j].item<double>());
    r.implicit_acc_by_t.push_back(by_t[0][j].item<double>());
    r.loss_by_t.push_back(by_t[1][j].item<double>());
    r.delta_by_t.push_back(by_t[2][j].item<double>());
  }
  r.implicit_acc = overall[0].item<double>();
  r.loss = overall[1].item<double>();
  r.delta = overall[2].item<double>();
  return r;
}

}  // namespace

nlohmann::json EvalResult::to_json(const std::string& method) const {
  return {{"kind", "eval"},
          {"step", step},
          {"method", method},
          {"pairs", pairs},
          {"t_bins", t_bins},
          {"implicit_acc", implicit_acc},
          {"loss", loss},
          {"delta", delta},
          {"implicit_acc_by_t", implicit_acc_by_t},
          {"loss_by_t", loss_by_t},
          {"delta_by_t", delta_by_t},
          {"misranked_by_t", misranked_by_t},
          {"credit_by_t", credit_by_t},
          {"z_by_t", z_by_t},
          {"seconds", seconds}};
}

struct Evaluator::Impl {
  EvaluatorContext ctx;
  pairs::PairPath path;
  std::unique_ptr<data::HeldOutPairs> reader;  // until the pairs are encoded
  int64_t total_pairs = 0;
  std::vector<EncodedPairs> encoded;
  bool encoded_ready = false;
  TestSeam test_hooks = TestSeam::from_environment();

  explicit Impl(EvaluatorContext context);
  // false when a stop was requested first; a later call goes on where this one stopped.
  bool encode_all();
  EncodedPairs encode(const data::PairBatch& batch);
  torch::Tensor errors_of(models::UNet& unet, const EncodedPairs& pairs) const;  // [nb, 2, B]
  // Adds one batch's figures at every bin to sums [7, nb] (see run()).
  void add_sums(const EncodedPairs& pairs, const objective::CorrectionEma& ema,
                torch::Tensor& sums) const;
  const std::vector<int64_t>& bins() const { return ctx.cfg->eval.t_bins; }
};

Evaluator::Impl::Impl(EvaluatorContext context)
    : ctx(std::move(context)),
      path(*ctx.manifest, *ctx.schedule, ctx.device, ctx.resolution, ctx.text, ctx.vae) {
  data::HeldOutOptions options;
  options.index_path = ctx.cfg->data.eval_index;
  options.resolution = ctx.resolution;
  options.rank = ctx.comm->rank();
  options.world_size = ctx.comm->world_size();
  options.max_bad_pairs = ctx.cfg->eval.max_bad_pairs;
  std::error_code ec;
  if (std::filesystem::equivalent(ctx.cfg->data.eval_index, ctx.cfg->data.index, ec)) {
    log::warn(
        "eval: data.eval_index is data.index ({}): the \"held-out\" accuracy is measured "
        "on training pairs and says nothing of generalisation; export a held-out split",
        ctx.cfg->data.index);
  }
  for (const models::TextEncoderInfo& e : ctx.manifest->text_encoders) {
    options.expected_vocab_sha256.push_back(e.vocab_sha256);
  }
  options.caption_tokenizers = pairs::caption_tokenizer_specs(*ctx.manifest);
  reader = std::make_unique<data::HeldOutPairs>(options);
  total_pairs = reader->total_pairs();
  std::string t_list;
  for (const int64_t t : bins()) t_list += (t_list.empty() ? "" : ",") + std::to_string(t);
  log::info("eval: {} held-out pairs in {}, t bins {}, every {} steps, seed {}", total_pairs,
            options.index_path, t_list, ctx.cfg->eval.every, ctx.cfg->eval.seed);
}

EncodedPairs Evaluator::Impl::encode(const data::PairBatch& batch) {
  const torch::Tensor noise =
      pairs::draw_eval_vae_noise(batch.pair_ids, ctx.cfg->eval.seed, path.latent_shape());
  const pairs::EncodedPairs batch_latents = path.encode(batch, noise);
  EncodedPairs out;
  out.pair_ids = batch.pair_ids;
  out.latents = batch_latents.latents.cpu();
  out.cond = conditioning_to(batch_latents.cond, torch::kCPU, 1);
  return out;
}

bool Evaluator::Impl::encode_all() {
  torch::NoGradGuard no_grad;
  const int64_t micro = ctx.cfg->train.micro_batch;
  while (reader) {
    if (stop_requested()) return false;
    std::optional<data::PairBatch> batch = reader->next(micro);
    if (!batch) break;
    encoded.push_back(encode(*batch));
  }
  reader.reset();
  // The reference's errors are fixed: once, with the trainer's reference or, for sft (which has
  // none), the initial model loaded just for this.
  std::unique_ptr<models::UNet> initial;
  models::UNet* reference = ctx.reference;
  if (reference == nullptr) {  // LoRA: the policy's base, no second copy
    initial = ctx.policy->has_adapters()
                  ? ctx.policy->base_view()
                  : std::make_unique<models::UNet>(*ctx.reference_manifest, ctx.device,
                                                   models::UNetOptions{});
    reference = initial.get();
  }
  for (EncodedPairs& pairs : encoded) {
    if (pairs.ref_errors.defined()) continue;
    if (stop_requested()) return false;
    pairs.ref_errors = errors_of(*reference, pairs).cpu();
  }
  encoded_ready = true;
  return true;
}

torch::Tensor Evaluator::Impl::errors_of(models::UNet& unet, const EncodedPairs& pairs) const {
  torch::NoGradGuard no_grad;
  // Every bin at once, bin-major, winners then losers: [nb * 2B, ...].
  const int64_t B = pairs.pair_ids.size(0);
  const auto nb = static_cast<int64_t>(bins().size());
  std::vector<torch::Tensor> eps_bins, t_bins;
  for (const int64_t bin_t : bins()) {
    const torch::Tensor e =
        pairs::draw_eval_eps(pairs.pair_ids, ctx.cfg->eval.seed, bin_t, path.latent_shape());
    eps_bins.push_back(torch::cat({e, e}, 0));  // one eps per pair, shared by winner and loser
    t_bins.push_back(torch::full({2 * B}, bin_t, torch::kLong));
  }
  const torch::Tensor eps = torch::cat(eps_bins, 0).to(ctx.device);
  const torch::Tensor x0 = pairs.latents.to(ctx.device).repeat({nb, 1, 1, 1});
  const models::Conditioning cond = conditioning_to(pairs.cond, ctx.device, nb);
  const auto predict = [&](const torch::Tensor& x, const torch::Tensor& t,
                           const models::Conditioning& c) { return ctx.predict(unet, x, t, c); };
  return path.errors(predict, x0, eps, torch::cat(t_bins, 0), cond).view({nb, 2, -1});
}

Evaluator::Evaluator(EvaluatorContext context)
    : impl_(std::make_unique<Impl>(std::move(context))) {}
Evaluator::~Evaluator() = default;

bool Evaluator::due(int64_t step) const {
  const config::TrainConfig& cfg = *impl_->ctx.cfg;
  return step % cfg.eval.every == 0 || step == cfg.train.max_steps;
}

void Evaluator::Impl::add_sums(const EncodedPairs& pairs, const objective::CorrectionEma& ema,
                               torch::Tensor& sums) const {
  const int64_t B = pairs.pair_ids.size(0);
  const torch::Tensor policy = errors_of(*ctx.policy, pairs);
  const torch::Tensor ref = pairs.ref_errors.to(ctx.device);
  for (int64_t j = 0; j < static_cast<int64_t>(bins().size()); ++j) {
    objective::PairErrors e;
    e.policy_w = policy[j][0];
    e.policy_l = policy[j][1];
    e.ref_w = ref[j][0];
    e.ref_l = ref[j][1];
    const torch::Tensor t = torch::full({B}, bins()[static_cast<size_t>(j)], torch::kLong);
    const torch::Tensor t_dev = t.to(ctx.device);
    const objective::MethodOutput out = objective::compute_method(
        ctx.method, e, t_dev, ema.correction(t).to(ctx.device), ctx.method_params, *ctx.schedule);
    const torch::Tensor delta = objective::delta(e);
    sums[0][j] += (delta < 0).sum().to(torch::kFloat64);
    sums[1][j] += out.loss.sum().to(torch::kFloat64);
    sums[2][j] += delta.sum().to(torch::kFloat64);
    sums[3][j] += static_cast<double>(B);
    sums[4][j] += (delta > 0).sum().to(torch::kFloat64);
    sums[5][j] += objective::credit_weight(ctx.method, out, t, *ctx.schedule).sum();
    if (out.z.defined()) sums[6][j] += out.z.detach().sum();
  }
}

std::optional<EvalResult> Evaluator::run(int64_t step, const objective::CorrectionEma& ema) {
  Impl& d = *impl_;
  const auto start = std::chrono::steady_clock::now();
  const int64_t rank = d.ctx.comm->rank();
  bool stopped = !d.encoded_ready && !d.encode_all();
  torch::NoGradGuard no_grad;
  const auto nb = static_cast<int64_t>(d.bins().size());
  // sums[k][j] over this rank's pairs at bin j: k = 0 Delta < 0, 1 loss, 2 Delta, 3 pairs,
  // 4 Delta > 0 (misranked), 5 credit k_t sigmoid(-z), 6 z (docs/method.md §7.4).
  // On the training device: they are all-reduced (NCCL takes device tensors only).
  torch::Tensor sums = torch::zeros({7, nb}, torch::dtype(torch::kFloat64).device(d.ctx.device));
  for (size_t i = 0; i < d.encoded.size() && !stopped; ++i) {
    d.test_hooks.before_eval_batch(rank, step, static_cast<int64_t>(i));
    stopped = stop_requested();  // an atomic load, as before every training micro-batch
    if (stopped) break;
    d.add_sums(d.encoded[i], ema, sums);
  }
  // As in a training step: a rank that was not signalled finishes first, then the ranks agree.
  if (d.ctx.comm->any(stopped)) return std::nullopt;
  std::vector<torch::Tensor> reduced{sums};
  d.ctx.comm->all_reduce_sum(reduced, kReduceBucketBytes);
  sums = sums.to(torch::kCPU);

  EvalResult r = result_from_sums(sums, step, d.bins());
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

bool Evaluator::run_if_due(int64_t step, const objective::CorrectionEma& ema, MetricsLog* metrics) {
  if (!due(step)) return true;
  const std::optional<EvalResult> result = run(step, ema);
  if (!result) {
    log::warn("eval step {}: stopped by a stop request, no record written", step);
    return false;
  }
  const EvalResult& r = *result;
  if (metrics == nullptr) return true;
  metrics->write(r.to_json(objective::method_name(impl_->ctx.method)));
  std::string by_t;
  for (size_t j = 0; j < r.t_bins.size(); ++j) {
    by_t += fmt::format(" t{} {:.3f}", r.t_bins[j], r.implicit_acc_by_t[j]);
  }
  log::info("eval step {}: held-out implicit accuracy {:.3f} ({}), loss {:.4f}, {} pairs, {:.1f} s",
            step, r.implicit_acc, by_t.substr(1), r.loss, r.pairs, r.seconds);
  return true;
}

}  // namespace dde::train
