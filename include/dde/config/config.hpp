// The one typed training configuration: YAML over the documented defaults below, then `--set`
// overrides, then validate(). Unknown keys, wrong types and out-of-range values are dde::Errors
// that name the key by its dotted path (and file:line:column where there is one).
//
// Paths are kept exactly as written and are relative to the working directory of the process, not
// to the config file (what torchrun/SLURM users expect: launch from the repository root).
//
// Knows nothing of models or tensors; the objective, data and training code map these fields onto
// their own option structs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace dde::config {

struct RunConfig {
  std::string output_dir;  // required: checkpoints, metrics.jsonl, logs
  uint64_t seed = 0;       // seeds every RNG of the run (data order, noise, timesteps)
  // auto | cpu | cuda | privateuseone; auto = cuda when available. privateuseone: an out-of-tree
  // backend registered as PyTorch's PrivateUse1 (the tests' strict fake accelerator).
  std::string device = "auto";
  // >= 0 LibTorch intra-op threads; 0 = from the CPUs this process is given (affinity, Slurm's
  // --cpus-per-task) less data.workers, at least 1 (util/threads.hpp). Logged at start-up.
  int64_t threads = 0;
  // off | warn | error: CUDA sync debug mode inside the micro-batch loop (a host sync there
  // warns or throws; torch.cuda.set_sync_debug_mode). No effect on the CPU.
  std::string cuda_sync_debug = "off";
};

struct ModelConfig {
  std::string manifest;               // required: manifest.json of the exported policy model
  std::string reference_manifest;     // frozen reference model; "" = the same export as `manifest`
  std::string frozen_dtype = "fp32";  // fp32 | bf16: weights of the reference UNet, VAE, text
                                      // encoders (bf16 ones run under bf16 autocast)
};

struct DataConfig {
  std::string index;         // required: index.json of the preference shards
  int64_t resolution = 0;    // training size in pixels, a multiple of 8 up to 8192; 0 = manifest's
  bool random_crop = false;  // random instead of center crop after the resize
  bool random_flip = true;   // horizontal flip, p = 0.5 per image (Diffusion-DPO)
  double caption_dropout = 0.2;   // in [0, 1]: probability that a caption becomes ""
  int64_t shuffle_buffer = 1000;  // in [1, 2^20] pairs held for shuffling across shards
  int64_t workers = 4;            // in [1, 256] decode threads
  int64_t prefetch_batches = 4;   // in [1, 1024] decoded micro-batches queued ahead
  bool keep_ties = false;         // false: tied pairs in the shards are skipped (and counted)
  // Images whose header claims more pixels are bad pairs (Pillow's MAX_IMAGE_PIXELS), as are
  // those with an aspect ratio over 20; both are refused before any pixel is allocated.
  int64_t max_image_pixels = 89478485;
  int64_t max_bad_pairs = 100;  // >= 0 skipped bad pairs (all ranks) before the run stops
  bool verify = false;          // sha256 every shard at start (sizes and counts always checked)
  std::string eval_index;       // index.json of held-out shards; "" = no held-out evaluation
  // index.json of a latent cache of data.index (dde_encode_cache); "" = encode the images and
  // captions while training. With a cache the VAE and text encoders are not loaded (unless
  // data.eval_index needs them); random_crop is then an error.
  std::string cache;
};

struct MethodConfig {
  // sft | uniform | discounted | dde_single | dde_step | dde | uniform_ct (docs/method.md §7.3)
  std::string name = "dde";
  double beta = 5000.0;           // > 0, DPO temperature (Diffusion-DPO default)
  double correction_scale = 1.0;  // s: weight of C_t in dde_step / dde (any finite value)
  double ema_momentum = 0.9;      // mu in [0, 1) of the delayed E update (docs/method.md §4)
  double gamma = 0.9;             // in (0, 1]: per-sampler-step discount of `discounted`
  int64_t sampler_steps = 50;     // > 0: K, sampler steps the discount counts in
  int64_t t_lo = 0;               // >= 0: timestep window [t_lo, t_hi)
  int64_t t_hi = -1;              // -1 = num_train_timesteps; else t_lo < t_hi <= T
  // paper | calibrated (dde_single and dde only): every beta in z becomes beta / G, G the
  // geometric mean of c_t over the sampleable t (docs/method.md §7.1).
  std::string temperature = "paper";
  bool ema_debias = false;  // C_t from E[k] / (1 - mu^n[k]) (docs/method.md §7.2)
};

struct OptimConfig {
  std::string name = "adamw";  // adamw | adafactor (transformers'; uses lr, weight_decay)
  double lr = 2.048e-5;        // > 0 peak learning rate (1e-8 x 2048, Diffusion-DPO)
  int64_t warmup_steps = 500;  // >= 0 linear warm-up steps, then the schedule
  // constant | cosine | linear: after warm-up, the lr stays (the paper's), or decays to
  // min_lr_ratio x lr at train.max_steps along a half cosine or a line.
  std::string schedule = "constant";
  double min_lr_ratio = 0.0;          // in [0, 1]: the decaying schedules' final lr / lr
  double beta1 = 0.9;                 // in [0, 1)
  double beta2 = 0.999;               // in [0, 1)
  double weight_decay = 0.01;         // >= 0, decoupled (AdamW)
  double eps = 1e-8;                  // > 0
  double grad_clip = 1.0;             // >= 0 max global grad norm; 0 disables clipping
  int64_t max_nonfinite_in_row = 10;  // >= 1 consecutive failed steps before the run stops
  // > 0: a step whose update changes the weights' global 2-norm by more than this fraction of it
  // fails, as a non-finite one does (it is rolled back to the last checkpoint that passed).
  double max_weight_change = 0.5;
};

struct TrainLoopConfig {
  int64_t global_batch = 2048;     // >= 1 pairs per optimizer step over all ranks
  int64_t micro_batch = 1;         // >= 1 pairs per forward per rank; accumulation is derived
  int64_t max_steps = 2000;        // >= 1 optimizer steps
  std::string precision = "fp32";  // fp32 | bf16 (autocast for the UNets' forward)
  // bf16: the UNets' output head (conv_norm_out, conv_out) of an fp32 model still runs in fp32, so
  // the per-pair errors that form Delta carry fp32 rather than bf16 rounding (bench/README.md).
  bool fp32_output_head = true;
  bool gradient_checkpointing = false;  // recompute each UNet block in backward
  bool allow_tf32 = true;               // CUDA: TF32 tensor cores for fp32 matmuls and convolutions
};

struct CheckpointConfig {
  int64_t every = 100;  // >= 1 optimizer steps between checkpoints
  int64_t keep = 3;     // >= 1 most recent checkpoints kept
  // >= 1 seconds the ranks wait for each other around a checkpoint write (a 10 GB SDXL state on a
  // slow disk outlasts dist.timeout_s, which bounds the training collectives).
  int64_t timeout_s = 3600;
};

struct LoggingConfig {
  int64_t every = 1;         // >= 1 optimizer steps between metrics lines
  bool per_sample = false;   // also log t, z and loss of every pair
  bool progress = true;      // progress line on the terminal (rank 0)
  bool tensorboard = false;  // also TensorBoard event files in run.output_dir/tensorboard
  int64_t dump_step = 0;     // >= 0: write the first micro-batch of this step (inputs, noise,
                             // per-pair errors) to debug/ for parity checks; 0 = never
};

// Held-out preference accuracy on data.eval_index (src/train/evaluator.cpp): at step 0, every
// `every` steps and at the last step, each pair at every t of t_bins, noise from (seed, pair, t).
struct EvalConfig {
  int64_t every = 100;  // >= 1 optimizer steps between evaluations
  std::vector<int64_t> t_bins = {100, 300, 500, 700, 900};  // non-empty, each in [0, T)
  uint64_t seed = 0;  // seeds the evaluation noise; not run.seed, so runs stay comparable
  // >= 0 held-out pairs (per rank) that fail the training set's checks (decode, vocabulary) and
  // are left out and counted before the run stops.
  int64_t max_bad_pairs = 10;
};

// Validation images (eval.sample, src/train/validation_images.cpp): at step 0, every `every`
// steps and at the last step, rank 0 samples the first `prompts` distinct captions of
// data.eval_index (else data.index) with the policy: DDIM with `steps` steps and classifier-free
// guidance `guidance` against the empty caption, image i from the noise of seed + i. One PNG grid
// per evaluation in run.output_dir/samples/ (and TensorBoard's images with logging.tensorboard).
struct SampleConfig {
  int64_t every = 0;      // >= 0 optimizer steps between grids; 0 = no validation images
  int64_t prompts = 4;    // in [1, 64] captions (one image each, four to a row)
  uint64_t seed = 0;      // image i starts from torch.randn with the seed seed + i
  int64_t steps = 20;     // in [1, 1000] DDIM steps (diffusers' leading spacing, offset 1)
  double guidance = 5.0;  // in [0, 100]; <= 1: no classifier-free guidance (as diffusers)
};

struct DistConfig {
  std::string backend = "auto";  // auto | gloo | nccl; auto = nccl on cuda, else gloo
  int64_t timeout_s = 600;       // > 0 seconds before a collective is declared hung
  bool shard_optimizer = false;  // ZeRO-1: each rank keeps the optimizer state of 1/world of
                                 // the parameters (whole tensors); docs/formats.md, section 3
  std::string init_method =
      "auto";  // env | slurm | auto (torchrun's env, then SLURM's, then 1 rank)
  bool force_process_group = false;  // a real process group at world size 1 (tests NCCL on 1 GPU)
};

struct TrainConfig {
  RunConfig run;
  ModelConfig model;
  DataConfig data;
  MethodConfig method;
  OptimConfig optim;
  TrainLoopConfig train;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  EvalConfig eval;
  SampleConfig sample;  // the YAML section eval.sample
  DistConfig dist;
};

bool operator==(const TrainConfig& a, const TrainConfig& b);
bool operator!=(const TrainConfig& a, const TrainConfig& b);

// Reads `path`, applies `overrides` ("section.key=value", the value parsed as YAML, e.g.
// "optim.lr=1e-4", "method.name=uniform") and validates. Throws dde::Error.
TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// The YAML tree (a map of sections, or null for all defaults) over the defaults, then validate().
// `source_name` names the tree in errors (a file name, "<string>", ...).
TrainConfig config_from_yaml(const YAML::Node& root, const std::string& source_name);

// Every field, every section, in declaration order; load(to_yaml(c)) == c.
std::string to_yaml(const TrainConfig& config);

// Range, choice, required and cross-field checks. Throws dde::Error naming the key.
void validate(const TrainConfig& config);

// Checks the timestep window against the schedule's T (known once the model is loaded).
void validate_against_timesteps(const TrainConfig& config, int64_t num_timesteps);
// method.t_hi with -1 resolved to num_timesteps.
int64_t effective_t_hi(const MethodConfig& method, int64_t num_timesteps);

// Every input file the config names (model.manifest, model.reference_manifest, data.index,
// data.eval_index, data.cache) exists and is a regular file; else a dde::Error naming the key and
// the absolute path, and a folder given for a file as such. (--dry-run and the trainer's start.)
void check_input_files(const TrainConfig& config);

// global_batch / (micro_batch x world_size); throws dde::Error unless it divides exactly.
int64_t accumulation_steps(const TrainConfig& config, int64_t world_size);

// A key whose value differs between two configs (a resume against its checkpoint's config.yaml).
struct ConfigChange {
  std::string key;  // dotted path, e.g. "optim.lr"
  std::string before, after;
};
// Every key that differs, in file order, with both values as config_from_yaml would read them.
std::vector<ConfigChange> config_changes(const TrainConfig& before, const TrainConfig& after);

}  // namespace dde::config
