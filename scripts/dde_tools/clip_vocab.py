"""CLIP tokenizer folders in the pipelines' format, written from a list of BPE merges.

- save_clip_tokenizer: vocab.json + merges.txt in CLIP's vocabulary order, saved through
  transformers' CLIPTokenizer.save_pretrained (so tokenizer_config.json and special_tokens_map.json
  are what transformers writes for a pipeline's tokenizer). The tiny fixtures use it with merges
  learned on synthetic captions (fixtures.make_tokenizer).
- build_full_tokenizer: CLIP's real 49,408-token tokenizer, offline, from the merges file that
  open_clip ships (bpe_simple_vocab_16e6.txt.gz), read as open_clip's SimpleTokenizer reads it.
  pad_token=EOS gives SD1.5's tokenizer/, pad_token="!" SDXL's tokenizer_2/.

CLI: python -m dde_tools.clip_vocab --out DIR [--pad-token TOKEN]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from dde_tools.common import ToolError, run_main

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's vocabulary: 256 byte characters, the same with "</w>", 48,894 merges, BOS and EOS.
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


def save_clip_tokenizer(out_dir: Path, merges: list[tuple[str, str]], pad_token: str = EOS) -> CLIPTokenizer:
    """Write a CLIP-format byte-level BPE tokenizer with these merges into `out_dir`.

    Vocabulary order as in CLIP: the 256 byte characters (id 0 is "!"), the same with
    "</w>", one token per merge, then <|startoftext|> and <|endoftext|>.
    """
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(set(tokens)) != len(tokens):
        raise ValueError("the merges produce a duplicate vocabulary entry")
    with tempfile.TemporaryDirectory() as raw:
        vocab_file, merges_file = Path(raw, "vocab.json"), Path(raw, "merges.txt")
        vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def open_clip_merges_file() -> Path:
    """open_clip's copy of CLIP's merges (bpe_simple_vocab_16e6.txt.gz), installed with it."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def clip_merges(path: Path | None = None) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines [1, 1 + 48894) of the gzip file (open_clip's SimpleTokenizer)."""
    lines = gzip.open(path or open_clip_merges_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES]]
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {CLIP_MERGES} merges of two symbols after the header")
    return merges  # type: ignore[return-value]


def build_full_tokenizer(out_dir: Path, pad_token: str = EOS) -> CLIPTokenizer:
    """CLIP's full tokenizer in `out_dir` (SD1.5's with the default pad, SDXL's tokenizer_2 with "!")."""
    tokenizer = save_clip_tokenizer(out_dir, clip_merges(), pad_token)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise ValueError(f"built {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the tokenizer folder to write")
    parser.add_argument("--pad-token", default=EOS, help=f'{EOS} (SD1.5, the default) or "!" (SDXL\'s tokenizer_2)')
    args = parser.parse_args(argv)

    def body() -> int:
        if args.out.exists() and not args.out.is_dir():
            raise ToolError(args.out, "--out exists and is not a folder", "a tokenizer folder to write", "a file",
                            "Pass a folder name (it is created).")
        build_full_tokenizer(args.out, args.pad_token)
        return 0

    return run_main("clip_vocab", body)


if __name__ == "__main__":
    sys.exit(main())
