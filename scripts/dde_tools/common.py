"""Helpers shared by the dde_tools exporters."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def vocab_sha256(tokenizer_dir: Path) -> str:
    """sha256 of a tokenizer folder's vocab.json bytes (how formats.md identifies a vocabulary)."""
    return hashlib.sha256((Path(tokenizer_dir) / "vocab.json").read_bytes()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path.tmp`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
