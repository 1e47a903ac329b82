"""Prompts as text in dde_train (docs/tokenizer.md): typed validation prompts and shards that carry
captions only, both tokenized in C++ with the tokenizer folders the export copied next to the
manifest.

- Typed captions give the grid that the same captions give when they come from the shards with
  the Python tokenizer's ids; their ids (prompts.json) are transformers' CLIPTokenizer's.
- A training run from caption-only shards (one export for every family) writes the per-pair and
  held-out records of the run from shards with ids, number for number.
- Bad text is named: a prompt file that is not UTF-8, a missing file, a caption-only pair whose
  caption is not UTF-8 (a counted bad pair with its shard and key).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer

from conftest import ROOT, read_records, rewrite_shards, run_train, tiny_overrides

SAMPLE = "eval.sample={{every: 1, prompts: {prompts}, steps: 2, guidance: 3.0, seed: 5}}"
TIMING = {"time", "wall_s", "step_s", "pairs_per_s", "data_wait_s", "wait_s", "elapsed_s", "eta_s",
          "memory", "seconds", "loader_wait_s", "throughput"}


def sample_run(dde_train: Path, fixtures: Path, out: Path, family: str, prompts: str, *sets: str):
    args = tiny_overrides(fixtures, family, out) + [
        "train.max_steps=1", "checkpoint.every=100", "logging.per_sample=false",
        SAMPLE.format(prompts=prompts), *sets]
    return run_train(dde_train, "tiny_dde.yaml", args)


def grid(out: Path) -> np.ndarray:
    return np.asarray(Image.open(out / "samples" / "step-00000000.png").convert("RGB"))


def flow_list(captions: list[str]) -> str:
    return "[" + ", ".join(json.dumps(c, ensure_ascii=False) for c in captions) + "]"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_typed_prompts_give_the_grid_of_the_same_captions_from_the_shards(dde_train, fixtures, tmp_path,
                                                                          family):
    from_shards = tmp_path / "count"
    r = sample_run(dde_train, fixtures, from_shards, family, "3")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((from_shards / "samples" / "prompts.json").read_text())
    captions = [c["caption"] for c in meta["cells"]]
    assert len(captions) == 3 and meta["prompts_from"].endswith("index.json")

    typed = tmp_path / "typed"
    r = sample_run(dde_train, fixtures, typed, family, flow_list(captions))
    assert r.returncode == 0, r.stderr[-3000:]
    typed_meta = json.loads((typed / "samples" / "prompts.json").read_text())
    assert [c["caption"] for c in typed_meta["cells"]] == captions
    assert typed_meta["prompts_from"] == "eval.sample.prompts"
    # the C++ ids are the shards' (Python's), so the images are the same to the bit
    assert [c["input_ids"] for c in typed_meta["cells"]] == [c["input_ids"] for c in meta["cells"]]
    assert np.array_equal(grid(typed), grid(from_shards))

    # the file form: one caption per line, CRLF and blank lines allowed
    listing = tmp_path / "watch.txt"
    listing.write_bytes(("\r\n".join(captions[:2]) + "\r\n\r\n  \n" + captions[2] + "\n").encode())
    from_file = tmp_path / "file"
    r = sample_run(dde_train, fixtures, from_file, family, json.dumps(str(listing)))
    assert r.returncode == 0, r.stderr[-3000:]
    file_meta = json.loads((from_file / "samples" / "prompts.json").read_text())
    assert [c["caption"] for c in file_meta["cells"]] == captions
    assert file_meta["prompts_from"] == str(listing)
    assert np.array_equal(grid(from_file), grid(from_shards))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_typed_prompts_are_tokenized_as_the_pipelines_tokenizer_does(dde_train, fixtures, tmp_path, family):
    """Text no shard holds (every clean-up step of CLIP's tokenizer, "" for the unconditional
    image): the ids in prompts.json are transformers' CLIPTokenizer's for each text encoder."""
    captions = ["", "A  RED&amp;blue “cube” on the ﬁeld", "日本の猫 🐈 ＡＢＣ", "x" * 400, "café\tnoir"]
    out = tmp_path / "run"
    r = sample_run(dde_train, fixtures, out, family, flow_list(captions))
    assert r.returncode == 0, r.stderr[-3000:]
    cells = json.loads((out / "samples" / "prompts.json").read_text())["cells"]
    assert [c["caption"] for c in cells] == captions
    manifest = json.loads((fixtures / "export" / family / "manifest.json").read_text())
    for k, encoder in enumerate(manifest["text_encoders"]):
        tokenizer = CLIPTokenizer.from_pretrained(fixtures / "export" / family / encoder["tokenizer"])
        expected = tokenizer(captions, padding="max_length", max_length=encoder["max_length"],
                             truncation=True).input_ids
        assert [c["input_ids"][k] for c in cells] == expected, encoder["name"]
        assert cells[0]["input_ids"][k] == encoder["empty_prompt_ids"]
    assert grid(out).shape[1] == 4 * manifest["resolution"]  # 5 cells: two rows of four


def test_bad_prompt_text_is_named(dde_train, fixtures, tmp_path):
    listing = tmp_path / "latin1.txt"
    listing.write_bytes("a red cube\nun caf\xe9 noir\n".encode("latin-1"))
    r = sample_run(dde_train, fixtures, tmp_path / "a", "sd15", json.dumps(str(listing)))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "not UTF-8" in r.stderr and f"{listing}: caption 2" in r.stderr and "0xE9" in r.stderr
    r = sample_run(dde_train, fixtures, tmp_path / "b", "sd15", json.dumps(str(tmp_path / "none.txt")))
    assert r.returncode == 1 and "input file not found" in r.stderr and "eval.sample.prompts" in r.stderr
    empty = tmp_path / "blank.txt"
    empty.write_text("\n \n")
    r = sample_run(dde_train, fixtures, tmp_path / "c", "sd15", json.dumps(str(empty)))
    assert r.returncode == 1 and "no caption in the eval.sample.prompts file" in r.stderr


def caption_only_eval(fixtures: Path, tmp_path: Path) -> Path:
    """The held-out rows exported without --tokenizer (the fixture's held-out shards carry ids)."""
    out = tmp_path / "eval_captions"
    subprocess.run([sys.executable, "-m", "dde_tools.export_pickapic", "--parquet",
                    *map(str, sorted((fixtures / "source" / "pickapic_eval").glob("*.parquet"))),
                    "--out", str(out), "--pairs-per-shard", "16"],
                   check=True, capture_output=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "scripts")})
    return out / "index.json"


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_caption_only_shards_train_as_the_shards_with_ids(dde_train, fixtures, tmp_path, family):
    eval_captions = caption_only_eval(fixtures, tmp_path)
    runs = {}
    for name, index, eval_index in (
            ("ids", fixtures / "shards" / family / "index.json", fixtures / "shards" / f"{family}_eval" / "index.json"),
            ("captions", fixtures / "shards" / "captions" / "index.json", eval_captions)):
        out = tmp_path / name
        r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, family, out) + [
            f"data.index={index}", f"data.eval_index={eval_index}", "train.max_steps=3", "eval.every=3",
            "eval.t_bins=[300, 700]", "checkpoint.every=100", "data.caption_dropout=0.25"])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = out
        if name == "captions":
            assert "holds captions only" in (out / "train.log").read_text()
    for kind in ("pair", "eval"):
        a, b = read_records(runs["ids"], kind), read_records(runs["captions"], kind)
        assert a and without_timing(a) == without_timing(b), kind
    steps = [without_timing(read_records(runs[n], "step")) for n in ("ids", "captions")]
    assert [s["loss"] for s in steps[0]] == [s["loss"] for s in steps[1]]


def test_a_caption_that_is_not_utf8_is_a_counted_bad_pair(dde_train, fixtures, tmp_path):
    """JSON cannot carry such bytes: the pair's metadata does not parse, and the loader skips the
    pair, counts it and names its shard and key, as any bad pair."""
    edited = []

    def edit(name: str, data: bytes) -> bytes:
        key, member = name.split(".", 1)
        if member == "json" and int(key) % 16 == 1:
            edited.append(key)
            return data.replace(b'"caption": "', b'"caption": "caf\xe9 ', 1)
        return data

    index = rewrite_shards(fixtures / "shards" / "captions" / "index.json", tmp_path / "shards", edit)
    out = tmp_path / "run"
    r = run_train(dde_train, "tiny_dde.yaml", tiny_overrides(fixtures, "sd15", out) + [
        f"data.index={index}", "train.max_steps=2", "checkpoint.every=100",
        "data.shuffle_buffer=1", "data.max_bad_pairs=10", "logging.per_sample=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    bad = read_records(out, "bad_pair")
    assert bad and {b["key"] for b in bad} <= set(edited), bad
    assert all(b["reason"] == "bad_metadata" and b["shard"].startswith("shard-") for b in bad)
    log = (out / "train.log").read_text()
    assert "ill-formed UTF-8" in log and f"{bad[0]['shard']}: member" in log and f"'{bad[0]['key']}.json'" in log
