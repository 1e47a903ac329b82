"""Function and file sizes of the C++ sources (the figures issue 19 asks for).

    python3 scripts/code_size.py [ROOT] [--top N] [--limit 60]

A function is a definition whose header line ends in "{" at namespace or class-body depth, as
clang-format lays them out here; its length counts from the first line of its signature to the
closing brace. Prints the longest functions and files of ROOT/src and those over the limits.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CONTROL = re.compile(r"^(if|for|while|switch|else|do|try|catch|namespace|enum|struct|class|union|"
                     r"extern|return)\b")


def strip_code(line: str) -> str:
    """The line without its // comment and the contents of string and char literals."""
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])*'", "''", line)
    return line.split("//")[0]


def functions(path: Path) -> list[tuple[str, int, int]]:
    """(name, first line, length) of each function defined in `path`: a brace that opens a body
    whose statement (the text since the last ';', '{' or '}' at that depth) looks like a function
    header: it has a parameter list and is not a control statement, a lambda or an initializer."""
    lines = path.read_text(errors="replace").splitlines()
    out = []
    depth = 0
    statement, start = "", None
    body_of = None  # (name, start line, depth) of the function being measured
    for i, raw in enumerate(lines):
        code = strip_code(raw).strip()
        if not code or code.startswith("#"):
            continue
        for ch in code:
            if ch == "{":
                text = statement.strip()
                head = text.split("(")[0]
                words = head.split()
                if (body_of is None and "(" in text and words and not CONTROL.match(text)
                        and "=" not in head and "[" not in words[-1]):
                    name = head.split()[-1] if head.split() else text
                    body_of = (name, start, depth)
                depth += 1
                statement = ""
            elif ch == "}":
                depth -= 1
                statement = ""
                if body_of is not None and depth == body_of[2]:
                    out.append((body_of[0], body_of[1] + 1, i - body_of[1] + 1))
                    body_of = None
            elif ch == ";":
                statement = ""
            else:
                if not statement.strip():
                    start = i
                statement += ch
        statement += " "
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=".")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--file-limit", type=int, default=400)
    args = parser.parse_args()
    src = Path(args.root) / "src"
    files = sorted(p for p in src.rglob("*") if p.suffix in (".cpp", ".hpp"))
    if not files:
        print(f"code_size: no C++ sources under {src}", file=sys.stderr)
        return 2
    funcs = [(n, f, l, size) for f in files for n, l, size in functions(f)]
    funcs.sort(key=lambda x: -x[3])
    sizes = sorted(((len(f.read_text(errors="replace").splitlines()), f) for f in files), reverse=True)
    rel = lambda f: f.relative_to(args.root)  # noqa: E731
    print(f"{len(funcs)} functions in {len(files)} files under {src}")
    print("longest functions:")
    for n, f, l, size in funcs[:args.top]:
        print(f"  {size:4d}  {n}  ({rel(f)}:{l})")
    print("longest files:")
    for n, f in sizes[:args.top]:
        print(f"  {n:4d}  {rel(f)}")
    over = [x for x in funcs if x[3] > args.limit]
    big = [x for x in sizes if x[0] > args.file_limit]
    print(f"functions over {args.limit} lines: {len(over)}; files over {args.file_limit} lines: {len(big)}")
    for n, f, l, size in over:
        print(f"  {size:4d}  {n}  ({rel(f)}:{l})")
    for n, f in big:
        print(f"  {n:4d}  {rel(f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
