#include "dde/checkpoint/checkpoint_store.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "dde/util/file_read.hpp"

namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("dde_ckpt_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  return p;
}

void write(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

TEST(CheckpointStore, CommitIsAtomicAndPrunesToKeep) {
  const fs::path root = fresh_dir("prune");
  dde::checkpoint::CheckpointStore store(root.string(), /*keep=*/2);
  for (int64_t step : {10, 20, 30}) {
    const fs::path staged = store.stage(step);
    write(staged / "payload", std::to_string(step));
    EXPECT_FALSE(fs::exists(root / dde::checkpoint::CheckpointStore::step_dir_name(step)));
    store.commit(step);
  }
  const auto all = store.complete_checkpoints();
  ASSERT_EQ(all.size(), 2U);
  EXPECT_EQ(fs::path(all[0]).filename(), "step-00000020");
  EXPECT_EQ(fs::path(all[1]).filename(), "step-00000030");
  EXPECT_EQ(*store.latest_complete(), all[1]);
  fs::remove_all(root);
}

TEST(CheckpointStore, CrashBeforeCommitLeavesPreviousCheckpointAsLatest) {
  const fs::path root = fresh_dir("crash");
  dde::checkpoint::CheckpointStore store(root.string(), 3);
  write(fs::path(store.stage(10)) / "payload", "good");
  store.commit(10);
  write(fs::path(store.stage(20)) / "payload", "half-writ");  // "crash": never committed
  // A directory that looks like a checkpoint but has no marker is not complete either.
  fs::create_directories(root / "step-00000030");
  EXPECT_EQ(fs::path(*store.latest_complete()).filename(), "step-00000010");
  store.remove_stale_staging();
  EXPECT_FALSE(fs::exists(root / ".staging-step-00000020"));
  fs::remove_all(root);
}

TEST(CheckpointStore, RecommittingAStepReplacesIt) {
  const fs::path root = fresh_dir("recommit");
  dde::checkpoint::CheckpointStore store(root.string(), 3);
  write(fs::path(store.stage(10)) / "payload", "first");
  store.commit(10);
  write(fs::path(store.stage(10)) / "payload", "second");
  const fs::path dir = store.commit(10);
  EXPECT_EQ(dde::util::read_text_file((dir / "payload").string(), 64, "payload"), "second");
  fs::remove_all(root);
}

TEST(CheckpointStore, EmptyStoreHasNoLatest) {
  const fs::path root = fresh_dir("empty");
  dde::checkpoint::CheckpointStore store(root.string(), 1);
  EXPECT_FALSE(store.latest_complete().has_value());
  fs::remove_all(root);
}

}  // namespace
