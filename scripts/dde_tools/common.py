"""Helpers shared by the dde_tools command-line tools: errors and exit codes, safe output folders,
bounded image decoding, progress.

Exit codes of every tool: 0 done; 1 a file could not be read or written while working (disk
full, file too large for the file system, I/O error) or memory ran out; 2 bad input (the message
says what, where, what was expected and found, and what to do); 3 (evaluate) done, but some
results are flagged as unusable. A traceback means a bug.

Output folders (`--out`): a tool never deletes what it did not write. It writes into a staging
folder next to `--out` and renames it into place when complete; `--out` may be absent, an empty
folder, or a previous output of the same tool, recognised by the marker file MARKER it writes
(which lists what it wrote). Anything else is refused before any work: a dde run, a checkpoint,
a diffusers pipeline, a folder holding files the tool did not write, a folder that contains an
input, a dangling link or a link loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import io
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

MARKER = ".dde_tool_output.json"
MARKER_FORMAT = "dde-tool-output"
STAGING_INFIX = ".dde-staging-"
PARTIAL_SUFFIX = ".dde-partial"
EXIT_IO, EXIT_BAD_INPUT, EXIT_FLAGGED = 1, 2, 3


class InputError(Exception):
    """Bad input: the tool prints the message and exits with status 2."""


class ToolError(InputError):
    """Bad user input, stated as what / where / expected / found / what to do."""

    def __init__(self, where: object, what: str, expected: str, actual: str, todo: str) -> None:
        super().__init__(f"{where}: {what}: expected {expected}; found {actual}. {todo}")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces (a model file may be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def vocab_sha256(tokenizer_dir: Path) -> str:
    """sha256 of a tokenizer folder's vocab.json bytes (how formats.md identifies a vocabulary)."""
    return hashlib.sha256((Path(tokenizer_dir) / "vocab.json").read_bytes()).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` as UTF-8 to `path.tmp` (no newline translation), then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode("utf-8"))
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path.tmp`, then rename it over `path`."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Errors and the main wrapper

_OS_HINTS = {
    errno.ENOSPC: "no space left on the device: free space or pass an --out on another file system",
    errno.EDQUOT: "disk quota exceeded: free space or pass an --out on another file system",
    errno.EFBIG: "file too large for this file system (FAT32 and some network file systems stop at 4 GiB; "
                 "or a ulimit -f): pass an --out on another file system",
    errno.EROFS: "read-only file system: pass an --out on a writable file system",
    errno.EACCES: "permission denied: pass a path you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: pass a path you can write, or fix its permissions",
    errno.ELOOP: "a symbolic link loop: fix or remove the link",
    errno.EIO: "an input/output error (a failing disk or network file system): check the device",
    errno.ENAMETOOLONG: "a file name too long for this file system: pass a shorter --out",
}


def describe_os_error(err: OSError) -> str:
    """`PATH: strerror (ENAME): what to do`, one line."""
    name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
    text = (f"{err.filename}: " if err.filename is not None else "") + f"{err.strerror or err}" + \
        (f" ({name})" if name else "")
    hint = _OS_HINTS.get(err.errno)
    return text + (f": {hint}" if hint else "")


def os_error_from(err: Exception, path: Path) -> OSError | None:
    """The OSError inside a library's write error (safetensors reports "... (os error 28)"), with the
    path written; None if `err` is not one."""
    import re

    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
    match = re.search(r"os error (\d+)", str(err))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code), str(path))
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Report a failed write (any library's) as an OSError naming `path`."""
    try:
        yield
    except Exception as err:
        converted = os_error_from(err, path)
        if converted is None:
            raise
        raise converted from err


def run_main(tool: str, body: Callable[[], int], *, on_os_error: str = "") -> int:
    """Run a tool's body: bad input (InputError) -> exit 2, a failed read or write (OSError) -> 1,
    out of memory -> 1, each as one line `TOOL: error: ...` on stderr; Ctrl-C -> 130."""
    try:
        return body()
    except InputError as err:
        print(f"{tool}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        print(f"{tool}: error: {describe_os_error(err)}{on_os_error}", file=sys.stderr)
        return EXIT_IO
    except MemoryError:
        print(f"{tool}: error: out of memory: lower the batch sizes or use a machine with more memory"
              f"{on_os_error}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print(f"{tool}: interrupted{on_os_error}", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------------
# What a folder holds

def _entries(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as err:
        raise ToolError(folder, "cannot list the folder", "a readable folder", describe_os_error(err),
                        "Fix its permissions or pass another path.") from err


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def is_checkpoint(folder: Path) -> bool:
    """A dde_train checkpoint (RUN/checkpoints/step-N): COMPLETE plus unet/ or trainer_state.json."""
    return _is_file(folder / "COMPLETE") and (_is_dir(folder / "unet") or _is_file(folder / "trainer_state.json"))


def read_marker(folder: Path) -> dict | None:
    """The marker of a tool output, or None when there is none (or it does not parse)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def what_it_holds(folder: Path) -> str | None:
    """A description of the dde run, checkpoint or model `folder` holds, or None."""
    for name, what in (("metrics.jsonl", "a dde run (metrics.jsonl)"), ("train.log", "a dde run (train.log)"),
                       ("trainer_state.json", "a dde checkpoint (trainer_state.json)")):
        if _is_file(folder / name):
            return what
    if _is_dir(folder / "checkpoints"):
        return "a dde run (checkpoints/)"
    if _is_file(folder / "COMPLETE"):
        return "a dde checkpoint (COMPLETE)"
    steps = [p for p in glob.glob(glob.escape(str(folder)) + "/step-*/COMPLETE")]
    if steps:
        return f"a dde run's checkpoints ({Path(steps[0]).parent.name}/COMPLETE)"
    marker = read_marker(folder)
    if _is_file(folder / "model_index.json") and marker is None and not _is_file(folder / "dde_export.json"):
        return "a diffusers pipeline (model_index.json not written by a dde tool)"
    if _is_file(folder / "manifest.json") and _is_dir(folder / "unet") and marker is None:
        return "an export_models output (manifest.json)"
    return None


def _contains(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


def _check_path(out: Path) -> Path:
    """The real path of `out` (links followed) after refusing loops, dangling links and files on the way."""
    path = Path(os.path.abspath(out))
    try:
        os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ToolError(out, "a symbolic link loop", "a folder or a path to create",
                            "links that point back to each other", "Remove the loop or pass another --out.") from err
        if err.errno == errno.ENOTDIR:
            raise ToolError(out, "a part of the path is a file", "folders all the way down",
                            "a file where a folder should be", "Pass another --out.") from err
        raise ToolError(out, "cannot access the path", "an accessible path", describe_os_error(err),
                        "Pass another --out.") from err
    else:
        return Path(os.path.realpath(path))
    # Absent: the nearest part that exists must be a folder, not a dangling link.
    probe = path
    while True:
        if os.path.islink(probe):
            target = os.readlink(probe)
            raise ToolError(out, "a dangling symbolic link" + ("" if probe == path else f" on the way ({probe})"),
                            "a folder or a path to create", f"a link to {target}, which does not exist",
                            "Remove the link, or create its target, or pass another --out.")
        if os.path.lexists(probe) or probe == probe.parent:
            break
        probe = probe.parent
    if not os.path.isdir(probe):
        raise ToolError(out, "a part of the path is a file", "folders all the way down", f"{probe} is a file",
                        "Pass another --out.")
    return Path(os.path.realpath(path))


def check_output(tool: str, out: Path, *, inputs: Iterable[Path] = (), no_write_inside: Iterable[Path] = (),
                 own_patterns: Sequence[str] = (), legacy: Callable[[Path], bool] | None = None) -> Path:
    """The real path of `--out` once it is safe to write (see the module docstring); raises ToolError.

    `inputs` must not be `--out` or inside it; `--out` must not lie inside `no_write_inside` folders.
    In a previous output, the entries the marker lists and those matching `own_patterns` are the
    tool's own; `legacy(folder)` recognises an output written before the marker existed.
    """
    real = _check_path(Path(out))
    for source in [*inputs, *no_write_inside]:
        source_real = Path(os.path.realpath(source))
        if _contains(real, source_real):
            raise ToolError(out, "--out holds an input" if real != source_real else "--out is an input",
                            "a folder apart from the inputs", f"the input {source}",
                            "Pass another --out (writing there would delete or mix with the input).")
    for source in no_write_inside:
        source_real = Path(os.path.realpath(source))
        if _contains(source_real, real):
            raise ToolError(out, "--out lies inside an input", "a folder outside the inputs",
                            f"inside {source}", "Pass an --out outside it.")
    for ancestor in [real, *real.parents]:
        if ancestor != real and is_checkpoint(ancestor):
            raise ToolError(out, "--out lies inside a dde checkpoint", "a folder outside checkpoints",
                            f"inside {ancestor}", "Pass an --out outside the run's checkpoints/.")
    if not os.path.lexists(real):
        return real
    if not real.is_dir():
        raise ToolError(out, "--out exists and is not a folder", "a folder (created if absent)", "a file",
                        "Pass a folder.")
    entries = _entries(real)
    if not entries:
        return real
    held = what_it_holds(real)
    if held:
        raise ToolError(out, f"--out holds {held}", f"an absent or empty folder, or an earlier {tool} output",
                        held, f"Pass another --out: {tool} never writes over what it did not write.")
    marker = read_marker(real)
    if marker is not None and marker.get("tool") != tool:
        raise ToolError(out, f"--out is the output of {marker.get('tool')}", f"an absent or empty folder, or an "
                        f"earlier {tool} output", f"{MARKER} naming {marker.get('tool')!r}", "Pass another --out.")
    if marker is None and not (legacy is not None and legacy(real)):
        raise ToolError(out, f"--out is not an output of {tool}", f"an absent or empty folder, or an earlier {tool} "
                        f"output (it holds {MARKER})", f"{len(entries)} entries such as {entries[:3]}",
                        f"Pass another --out: {tool} never writes over what it did not write.")
    own = set(marker.get("entries", [])) if marker else set()
    foreign = [e for e in entries if e not in (MARKER, MARKER + ".tmp") and e not in own
               and not any(fnmatch.fnmatchcase(e, p) for p in own_patterns)]
    if foreign:
        raise ToolError(out, f"--out holds files {tool} did not write", f"only what an earlier {tool} wrote",
                        f"{foreign[:5]}{' ...' if len(foreign) > 5 else ''}",
                        "Move them out or pass another --out.")
    return real


def write_marker(folder: Path, tool: str, entries: Iterable[str] | None = None, **extra: Any) -> None:
    """Write (atomically) the marker that makes `folder` a recognised output of `tool`."""
    listed = sorted(set(entries if entries is not None else os.listdir(folder)) - {MARKER})
    write_json_atomic(folder / MARKER, {"format": MARKER_FORMAT, "version": 1, "tool": tool, "entries": listed,
                                        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | extra)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_output_parent(path: Path, out: Path) -> None:
    """mkdir with parents; a failure names the folder that cannot be created (exit 2: a bad --out)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ToolError(out, "cannot create the folder that holds --out", "a writable folder",
                        describe_os_error(err), "Pass an --out in a folder you can write.") from err


class StagedOutput:
    """A staging folder next to `out` that `publish` renames into place.

    Non-resumable: OUT.dde-staging-<pid>, removed on failure (and, if left by a killed run, by the
    next run of the same tool). Resumable: OUT.dde-partial, kept on failure so that a rerun goes on
    from it. Either holds the marker from the start and an exclusive flock while in use.
    """

    def __init__(self, tool: str, out: Path, resumable: bool = False) -> None:
        self.tool, self.out, self.resumable = tool, Path(out), resumable
        parent = self.out.parent
        make_output_parent(parent, self.out)
        name = self.out.name + (PARTIAL_SUFFIX if resumable else f"{STAGING_INFIX}{os.getpid()}")
        self.folder = parent / name
        self._remove_stale()
        if resumable and os.path.lexists(self.folder):
            marker = read_marker(self.folder)
            if os.path.islink(self.folder) or not self.folder.is_dir() or marker is None or marker["tool"] != tool:
                raise ToolError(self.folder, "a leftover that is not a partial output of " + tool,
                                f"a partial {tool} output (with {MARKER}) or nothing", "something else",
                                "Move it away and run again.")
        else:
            try:
                self.folder.mkdir()
            except OSError as err:
                raise ToolError(self.out, "cannot create a folder next to --out", f"a writable {parent}",
                                describe_os_error(err), "Pass an --out in a folder you can write.") from err
            write_marker(self.folder, tool, [], complete=False)
        self._lock = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(self._lock)
            raise ToolError(self.out, f"another {tool} is writing this output", "one run at a time",
                            f"{self.folder} locked", "Wait for it to end.") from err
        self.published = False

    def _remove_stale(self) -> None:
        pattern = glob.escape(str(self.out)) + STAGING_INFIX + "*"
        for leftover in map(Path, glob.glob(pattern)):
            pid = leftover.name.rsplit(STAGING_INFIX, 1)[1]
            marker = read_marker(leftover)
            if pid.isdigit() and not _pid_alive(int(pid)) and marker is not None and marker["tool"] == self.tool \
                    and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)

    def publish(self, **extra: Any) -> Path:
        """Rename the staging folder to `out`; a previous output there is removed after the rename."""
        write_marker(self.folder, self.tool, complete=True, **extra)
        os.close(self._lock)
        self._lock = -1
        if os.path.lexists(self.out) and os.listdir(self.out):
            old = self.out.with_name(f"{self.out.name}.dde-old-{os.getpid()}")
            os.rename(self.out, old)
            os.rename(self.folder, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.folder, self.out)  # also over an empty folder
        self.published = True
        return self.out

    def close(self, failed: bool) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
        if self.published:
            return
        keep = self.resumable and failed and set(os.listdir(self.folder)) - {MARKER}
        if not keep:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


def first_nonfinite(module) -> tuple[str, int] | None:
    """(name, count) of the first floating-point parameter of a torch module holding NaN or Inf
    values, or of a buffer holding NaN (buffers such as attention masks hold -inf by design); else None."""
    tensors = [(name, tensor, True) for name, tensor in module.named_parameters()]
    tensors += [(name, tensor, False) for name, tensor in module.named_buffers()]
    for name, tensor, parameter in tensors:
        if tensor.is_floating_point() and tensor.numel():
            bad = ~tensor.detach().isfinite() if parameter else tensor.detach().isnan()
            if bool(bad.any()):
                return name, int(bad.sum())
    return None


# ----------------------------------------------------------------------------------------------
# TorchScript's deprecation

# torch 2.11 warns on each torch.jit.trace/save/load/script call: "`torch.jit.save` is deprecated.
# Please switch to `torch.export`." (from Python 3.14: "... is not supported in Python 3.14+ and
# may break.").
TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.\w+` is (deprecated|not supported in Python)"
TORCHSCRIPT_NOTE = ("dde_tools: note: torch says \"{warning}\"; dde pins torch (requirements.txt) and keeps "
                    "TorchScript as the model format its C++ trainer loads (docs/architecture.md, "
                    "\"TorchScript: pinned, deprecated\")")
_torchscript_noted = False


@contextlib.contextmanager
def torchscript_deprecation_noted() -> Iterator[None]:
    """Show TorchScript's deprecation warnings as one line on stderr, once per process.

    Only DeprecationWarnings whose message matches TORCHSCRIPT_DEPRECATION are taken; every other
    warning goes on to the filters and handler in place (pytest's recorder included).
    """
    import re

    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=TORCHSCRIPT_DEPRECATION, category=DeprecationWarning)
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            global _torchscript_noted
            if not (issubclass(category, DeprecationWarning) and re.match(TORCHSCRIPT_DEPRECATION, str(message))):
                show_other(message, category, filename, lineno, file, line)
            elif not _torchscript_noted:
                _torchscript_noted = True
                print(TORCHSCRIPT_NOTE.format(warning=str(message).strip()), file=sys.stderr, flush=True)

        warnings.showwarning = show
        yield


# ----------------------------------------------------------------------------------------------
# Images

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS: ~256 MiB as RGB


@contextlib.contextmanager
def strict_pillow() -> Iterator[None]:
    """Truncated data is an error, and the pixel budget is the caller's check, not a warning."""
    from PIL import Image, ImageFile

    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


class ImageTooLarge(ValueError):
    """An image whose header announces more pixels than allowed (nothing was decoded)."""


def open_image_rgb(source: bytes | Path, max_pixels: int = MAX_IMAGE_PIXELS):
    """The image decoded as RGB, its size checked from the header before any pixel is decoded:
    memory is bounded by max_pixels x 3 bytes (plus the decoder's). Raises ImageTooLarge, or
    whatever Pillow raises for data it cannot decode (MemoryError is never turned into either)."""
    from PIL import Image

    with strict_pillow():
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except Image.DecompressionBombError as err:
            raise ImageTooLarge(str(err)) from err
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{width}x{height} = {width * height} pixels > {max_pixels}")
            return image.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Progress

class Progress:
    """A progress bar on stderr: tqdm when it is installed (a dependency of huggingface_hub), else
    a line every `every` seconds and at the end."""

    def __init__(self, total: int, label: str, initial: int = 0, every: float = 10.0) -> None:
        self.total, self.label, self.count, self.every = total, label, initial, every
        self._last = 0.0
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
            self._line()
        else:
            self._bar = tqdm(total=total, initial=initial, desc=label, unit="img", file=sys.stderr,
                             dynamic_ncols=True, mininterval=1.0)

    def _line(self) -> None:
        print(f"{self.label}: {self.count}/{self.total}", file=sys.stderr, flush=True)
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last >= self.every or self.count >= self.total:
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
