"""The real dde_train binary on broken data (issue 9): every bad input ends in a message that
names it, or in a counted skip; none crashes, hangs or trains on bad bytes.

Each test copies the tiny SD1.5 shard export (scripts/prepare_tiny.sh) and breaks it with
Python's tarfile/json, independently of the C++ reader: images replaced, frame headers
rewritten, token ids, counts, paths and hashes in index.json.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import rewrite_members, run_train, tiny_overrides

STEPS = 3  # 4 pairs per step: 12 of the fixture's pairs


def copy_export(fixtures: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(fixtures / "shards" / "sd15", dst)
    return dst


def with_jpeg_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its frame header (SOF0..SOF2) claiming height x width."""
    data = bytearray(jpeg)
    i = 2
    while i + 9 < len(data):
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    steps, bad = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "step":
            steps.append(rec)
        elif rec["kind"] == "bad_pair":
            bad.append(rec)
    return steps, bad


def train(dde_train: Path, fixtures: Path, export: Path, out: Path, *sets: str, resume: bool = False,
          env: dict | None = None):
    args = tiny_overrides(fixtures, "sd15", out) + [
        f"data.index={export / 'index.json'}",
        f"train.max_steps={STEPS}",
        "optim.warmup_steps=0",
        "logging.per_sample=false",
        "data.shuffle_buffer=1",  # shard order: the broken pairs come early
        *sets,
    ]
    return run_train(dde_train, "tiny_dde.yaml", args, resume=resume, env=env)


def break_three_pairs(fixtures: Path, tmp_path: Path) -> Path:
    """In every shard (16 pairs each): pair 5 a GIF, pair 7 a JPEG header claiming 26000 x
    26000, pair 9 a token id far outside the vocabulary. With shuffle_buffer 1 the run reads
    one shard in order: step 1 takes pairs 0-3, step 2 skips 5, 7, 9 and takes 4, 6, 8, 10."""
    export = copy_export(fixtures, tmp_path)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")

    def edit(name: str, data: bytes) -> bytes:
        key, member = name.split(".", 1)
        if (int(key) % 16, member) == (5, "0.jpg"):
            return gif.getvalue()
        if (int(key) % 16, member) == (7, "1.jpg"):
            return with_jpeg_size(data, 26000, 26000)
        if (int(key) % 16, member) == (9, "json"):
            meta = json.loads(data)
            meta["input_ids"][0][1] = 10**6
            return json.dumps(meta).encode()
        return data

    for shard in json.loads((export / "index.json").read_text())["shards"]:
        rewrite_members(export, shard["file"], edit)
    return export


def test_bad_pairs_are_skipped_counted_and_resume_skips_them_again(dde_train, fixtures, tmp_path):
    export = break_three_pairs(fixtures, tmp_path)
    out = tmp_path / "run"
    keep = ("data.max_bad_pairs=3", "checkpoint.every=1", "checkpoint.keep=5")
    r = train(dde_train, fixtures, export, out, *keep)
    assert r.returncode == 0, r.stderr[-4000:]
    steps, bad = read_records(out)
    assert [s["bad_pairs"] for s in steps] == [0, 3, 3]
    assert all(b["step"] == 2 for b in bad)
    assert sorted(b["reason"] for b in bad) == ["image_too_large", "token_id_out_of_range",
                                                 "unsupported_image_format"]
    assert len({b["shard"] for b in bad}) == 1 and all(b["rank"] == 0 for b in bad)
    assert sorted(int(b["key"]) % 16 for b in bad) == [5, 7, 9]
    assert "26000x26000 = 676000000 pixels" in r.stderr and "got 1000000" in r.stderr
    assert (out / "train.log").read_text().count("skipped bad pair") == 3

    # Resume from step 1, before them: the same pairs are skipped again, nothing else.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for step_dir in sorted((resumed / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(step_dir)
    rank = json.loads(next((resumed / "checkpoints").glob("step-*/rank-00000.json")).read_text())
    r = train(dde_train, fixtures, export, resumed, *keep, resume=True)
    assert r.returncode == 0, r.stderr[-4000:]
    steps_resumed, bad_resumed = read_records(resumed)
    assert bad_resumed == bad
    assert [s["bad_pairs"] for s in steps_resumed] == [s["bad_pairs"] for s in steps]
    assert [s["loss"] for s in steps_resumed] == [s["loss"] for s in steps]
    assert rank["loader"]["bad_pairs"] == steps[0]["bad_pairs"]


def test_too_many_bad_pairs_stop_with_a_summary_and_a_checkpoint(dde_train, fixtures, tmp_path):
    export = break_three_pairs(fixtures, tmp_path)
    out = tmp_path / "run"
    r = train(dde_train, fixtures, export, out, "data.max_bad_pairs=1", "checkpoint.every=100")
    assert r.returncode == 1
    message = r.stderr[r.stderr.rfind("too many bad pairs"):]
    assert "at most data.max_bad_pairs = 1" in message, r.stderr[-3000:]
    assert "unsupported_image_format 1" in message and "image_too_large 1" in message
    assert list((out / "checkpoints").glob("step-*/COMPLETE"))


def test_shards_are_checked_at_start(dde_train, fixtures, tmp_path):
    """Counts, paths, sizes, hashes, versions and numbers of index.json: refused before the
    first step (no metrics, no checkpoint), with the file and field named."""
    cases = {
        "count": (lambda i: i["shards"][1].update(pairs=i["shards"][1]["pairs"] - 1),
                  ["shard pair count does not match index.json", "shards[1]", "in the tar headers"]),
        "parent": (lambda i: i["shards"][0].update(file="../sd15/" + i["shards"][0]["file"]),
                   ["shard path leaves the index's folder", "shards[0]: file"]),
        "absolute": (lambda i: i["shards"][0].update(file="/etc/passwd"),
                     ["shard path leaves the index's folder", "'/etc/passwd'"]),
        "size": (lambda i: i["shards"][0].update(bytes=i["shards"][0]["bytes"] + 512),
                 ["shard size does not match index.json", "shards[0]: bytes"]),
        "version": (lambda i: i.update(version=1), ["unsupported shard index version",
                                                    "re-export the shards"]),
    }
    for name, (edit, parts) in cases.items():
        export = copy_export(fixtures, tmp_path / name)
        index = json.loads((export / "index.json").read_text())
        edit(index)
        (export / "index.json").write_text(json.dumps(index))
        out = tmp_path / name / "run"
        r = train(dde_train, fixtures, export, out)
        assert r.returncode == 1, (name, r.stderr[-2000:])
        for part in parts:
            assert part in r.stderr, (name, part, r.stderr[-2000:])
        assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir()), name

    export = copy_export(fixtures, tmp_path / "number")
    text = (export / "index.json").read_text()
    (export / "index.json").write_text(text.replace('"pairs": 16', '"pairs": 1e400', 1))
    r = train(dde_train, fixtures, export, tmp_path / "number" / "run")
    assert r.returncode == 1
    assert f"{export / 'index.json'}: near field 'pairs'" in r.stderr, r.stderr[-2000:]


def test_sha256_is_verified_on_request(dde_train, fixtures, tmp_path):
    export = copy_export(fixtures, tmp_path)
    index = json.loads((export / "index.json").read_text())
    shard = export / index["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] = 7  # inside the end-of-archive zeros: same size, the pairs are intact
    shard.write_bytes(bytes(data))
    r = train(dde_train, fixtures, export, tmp_path / "unverified")
    assert r.returncode == 0, r.stderr[-3000:]
    r = train(dde_train, fixtures, export, tmp_path / "verified", "data.verify=true")
    assert r.returncode == 1
    assert "shard sha256 does not match index.json" in r.stderr and "shards[2]" in r.stderr


@pytest.mark.parametrize(
    "sets, parts",
    [
        (["data.workers=100000"], ["data.workers", "in [1, 256]", "100000"]),
        (["data.resolution=1048576"], ["data.resolution", "in [0, 8192]"]),
        (["data.resolution=4096", "train.micro_batch=64", "train.global_batch=64"],
         ["train.micro_batch", "data.resolution^2 <= 268435456", "64 x 4096^2"]),
        (["data.shuffle_buffer=1000000000000"], ["data.shuffle_buffer", "1048576"]),
        (["data.max_image_pixels=0"], ["data.max_image_pixels"]),
    ],
)
def test_absurd_sizes_are_refused_at_validation(dde_train, fixtures, tmp_path, sets, parts):
    r = train(dde_train, fixtures, fixtures / "shards" / "sd15", tmp_path / "run", *sets)
    assert r.returncode == 1
    for part in parts:
        assert part in r.stderr, (part, r.stderr[-2000:])
    assert "bad_alloc" not in r.stderr
