"""Every link in the README, docs/ and configs/ points at a file of this repository: a user
reading a clone must find what is linked (the method note was once only outside it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")  # markdown [text](target)
PATH_MENTION = re.compile(r"(?<![\w/.])((?:\.\./)+[\w./-]+)")  # ../somewhere in any text


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "configs").glob("*.yaml"))]


def bad_links(path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text()
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue  # a web page, not a file of ours
        resolved = (path.parent / target).resolve()
        if not resolved.is_relative_to(root) or not resolved.exists():
            bad.append(f"{path.relative_to(root)}: ({target}) -> {resolved}")
    for mention in PATH_MENTION.findall(text):
        if not (path.parent / mention).resolve().is_relative_to(root):
            bad.append(f"{path.relative_to(root)}: {mention} points outside the repository")
    return bad


def test_every_link_resolves_inside_the_repository():
    docs = documents()
    assert len(docs) > 5 and (ROOT / "docs" / "method.md") in docs
    problems = [p for doc in docs for p in bad_links(doc)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_links_outside_or_missing(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (tmp_path / "shared.md").write_text("outside\n")
    (root / "docs" / "method.md").write_text("the method\n")
    doc = root / "docs" / "guide.md"
    doc.write_text("[ok](method.md) [web](https://example.org/a) [out](../../shared.md)\n"
                   "[gone](missing.md) and see ../../shared.md\n")
    problems = bad_links(doc, root)
    assert len(problems) == 4, problems  # the outside link counts as a link and as a path
    assert any("(../../shared.md)" in p for p in problems)
    assert any("(missing.md)" in p for p in problems)
    assert any("points outside the repository" in p for p in problems)
