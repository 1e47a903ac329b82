"""Parity of the C++ CLIP tokenizer (src/text/, driven through build/dde_tokenize) with the pipelines'
Python tokenizer, transformers' CLIPTokenizer.from_pretrained(dir)(caption, padding="max_length",
max_length=77, truncation=True).input_ids, on the caption set of dde_tools.caption_set (seed 0) and
four tokenizer folders: CLIP's full vocabulary as SD1.5's tokenizer (pad <|endoftext|>) and as
SDXL's tokenizer_2 (pad "!"), both built offline from open_clip's merges (dde_tools.clip_vocab),
and the tiny fixtures' two.

A line whose ids differ is classified by its reason (docs/tokenizer.md, "Differences"):
- mojibake: ftfy's fix_encoding repaired it, which the C++ side does not reproduce; the C++ ids
  are then exactly those of a CLIPTokenizer whose ftfy runs with fix_encoding=False;
- newer_unicode: it holds a letter or digit that Python's `regex` module knows and ICU 72
  (Unicode 15.0) does not;
- other: anything else, a bug. Its count must be 0; the other counts must equal the documented ones.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import unicodedata
from collections import defaultdict
from pathlib import Path

import ftfy
import pytest
import regex
from transformers import CLIPTokenizer

from dde_tools import caption_set, clip_vocab, ftfy_tables

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("DDE_BUILD_DIR", REPO / "build"))
DDE_TOKENIZE = BUILD_DIR / "dde_tokenize"
MAX_LENGTH = 77

# docs/tokenizer.md: the lines of the caption set (seed 0) whose ids differ, by reason.
EXPECTED_DIFFERENCES = {"mojibake": 87, "newer_unicode": 9}
TOKENIZERS = ("sd15_full", "sdxl_full_tokenizer_2", "sd15_tiny", "sdxl_tiny_tokenizer_2")
NEWER_LETTER = regex.compile(r"[\p{L}\p{N}]")


@pytest.fixture(scope="session")
def dde_tokenize() -> Path:
    if not DDE_TOKENIZE.is_file():
        pytest.fail(f"{DDE_TOKENIZE} is not built: run scripts/build.sh (or set DDE_BUILD_DIR)")
    return DDE_TOKENIZE


@pytest.fixture(scope="session")
def tokenizer_dirs(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    full = tmp_path_factory.mktemp("clip_full")
    clip_vocab.build_full_tokenizer(full / "sd15")
    clip_vocab.build_full_tokenizer(full / "sdxl_2", pad_token="!")
    return {
        "sd15_full": full / "sd15",
        "sdxl_full_tokenizer_2": full / "sdxl_2",
        "sd15_tiny": fixture_dir / "sd15" / "tokenizer",
        "sdxl_tiny_tokenizer_2": fixture_dir / "sdxl" / "tokenizer_2",
    }


@pytest.fixture(scope="session")
def captions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[caption_set.Caption]]:
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    captions = caption_set.make_caption_set(seed=0)
    caption_set.write_caption_set(path, captions)
    return path, captions


def run_tokenize(binary: Path, folder: Path, stdin: bytes, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(folder), *args], input=stdin, capture_output=True, check=False)


def reference_ids(tokenizer: CLIPTokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids


def reason(text: str, ours: list[int], without_mojibake_repair: CLIPTokenizer) -> str:
    """Why dde_tokenize's ids for `text` differ from CLIPTokenizer's."""
    if reference_ids(without_mojibake_repair, [text])[0] == ours:
        return "mojibake"
    if any(unicodedata.category(c) == "Cn" and NEWER_LETTER.match(c) for c in text):
        return "newer_unicode"
    return "other"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_ids_equal_clip_tokenizer_on_the_caption_set(name, dde_tokenize, tokenizer_dirs, captions):
    path, caption_list = captions
    folder = tokenizer_dirs[name]
    proc = run_tokenize(dde_tokenize, folder, path.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    ours = [json.loads(line) for line in proc.stdout.decode().split("\n")[:-1]]
    texts = caption_set.read_captions(path)
    assert texts == [c.text for c in caption_list] and len(ours) == len(texts)

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    without_repair = CLIPTokenizer.from_pretrained(folder)
    without_repair.fix_text = functools.partial(ftfy.fix_text, fix_encoding=False)
    differences: dict[str, list[str]] = defaultdict(list)
    for i, expected in enumerate(reference_ids(tokenizer, texts)):
        if ours[i] != expected:
            differences[reason(texts[i], ours[i], without_repair)].append(
                f"line {i + 1} ({caption_list[i].kind}): {texts[i]!r}")
    counts = {why: len(lines) for why, lines in differences.items()}
    print(f"\n{name}: {len(texts)} captions, differences {counts}")
    assert not differences["other"], "ids differ from CLIPTokenizer's:\n" + "\n".join(differences["other"][:30])
    assert {why: n for why, n in counts.items() if n} == EXPECTED_DIFFERENCES, "\n".join(
        line for lines in differences.values() for line in lines)


def test_tokens_equal_clip_tokenizer_tokenize(dde_tokenize, tokenizer_dirs):
    texts = ["wow!! a cat's <|endoftext|> &amp; ﬁne", "", "ＬＯＵＤ", "İstanbul ΟΔΥΣΣΕΥΣ"]
    for name in ("sd15_full", "sdxl_full_tokenizer_2"):
        folder = tokenizer_dirs[name]
        proc = run_tokenize(dde_tokenize, folder, "".join(t + "\n" for t in texts).encode(), "--tokens")
        assert proc.returncode == 0, proc.stderr.decode()
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        ours = [json.loads(line) for line in proc.stdout.decode().splitlines()]
        assert ours == [tokenizer.tokenize(t) for t in texts]


def test_a_line_that_is_not_utf8_is_named(dde_tokenize, tokenizer_dirs):
    folder = tokenizer_dirs["sd15_tiny"]
    stdin = b"a cat\nbad \xff\xfe line\na dog\n"
    stop = run_tokenize(dde_tokenize, folder, stdin)
    assert stop.returncode == 1
    assert len(stop.stdout.decode().splitlines()) == 1  # the line before it, then nothing
    assert "line 2" in stop.stderr.decode() and "byte 4 of 11" in stop.stderr.decode()
    assert "0xFF 0xFE" in stop.stderr.decode()
    skip = run_tokenize(dde_tokenize, folder, stdin, "--on-error", "skip")
    assert skip.returncode == 3, skip.stderr.decode()
    lines = skip.stdout.decode().splitlines()
    assert len(lines) == 3 and lines[1] == "null" and len(json.loads(lines[2])) == MAX_LENGTH
    assert "1 of 3 lines were not UTF-8" in skip.stderr.decode()


def test_a_broken_folder_is_named(dde_tokenize, tokenizer_dirs, tmp_path):
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    for f in tokenizer_dirs["sd15_tiny"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    merges = (broken / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges[5] = merges[5] + " extra"
    (broken / "merges.txt").write_text("\n".join(merges), encoding="utf-8")
    proc = run_tokenize(dde_tokenize, broken, b"a cat\n")
    assert proc.returncode == 1
    assert f"{broken / 'merges.txt'}:6" in proc.stderr.decode(), proc.stderr.decode()
    (broken / "vocab.json").unlink()
    proc = run_tokenize(dde_tokenize, broken, b"a cat\n")
    assert proc.returncode == 1 and str(broken / "vocab.json") in proc.stderr.decode()


def test_full_vocabulary_is_open_clips(tokenizer_dirs):
    """The folder built from open_clip's merges tokenizes as open_clip's own tokenizer does
    (captions without '!', which tokenizer_2 cuts out, or HTML, which open_clip unescapes twice)."""
    from open_clip.tokenizer import SimpleTokenizer

    texts = ["a photo of a cat", "A Café in PARIS at night, oil painting, 8k", "it's 3.14 “quoted” ﬁne",
             "東京の夜景 🐱🏳️‍🌈", "", " ".join(["long"] * 100)]
    reference = SimpleTokenizer()(texts, context_length=MAX_LENGTH).tolist()  # pads with 0, id of "!"
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dirs["sdxl_full_tokenizer_2"])
    assert len(tokenizer) == clip_vocab.CLIP_VOCAB_SIZE
    assert reference_ids(tokenizer, texts) == reference


def test_ftfy_tables_are_current():
    """src/text/ftfy_tables.cpp is what dde_tools.ftfy_tables generates from the pinned ftfy and Python."""
    committed = (REPO / "src" / "text" / "ftfy_tables.cpp").read_text(encoding="utf-8")
    assert committed == ftfy_tables.generate(), "regenerate it: python -m dde_tools.ftfy_tables"
