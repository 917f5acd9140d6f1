"""Writing model folders and files so that nothing is ever half-written: build in a temporary sibling, then rename.

Next to a target NAME, a write uses `.NAME.tmp-PID-XXXX` (the folder or file being written) and, when a folder is
replaced, `.NAME.old-PID-XXXX` (the previous folder, for the instant between the two renames). An exception or
Ctrl-C removes both and leaves NAME exactly as it was. After a hard kill (SIGKILL, power loss) they can remain; the
next write to the same NAME deletes those of processes that no longer run and, when NAME itself is missing because
the kill fell between the two renames, first puts the previous folder back.
"""

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Protocol


class SavesPretrained(Protocol):
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> object: ...


class ExtraFiles:
    """Named files (text or bytes) to write beside a model, e.g. a model card and results:
    `save_pretrained_atomically(path, model, tokenizer, ExtraFiles({"README.md": card}))`."""

    def __init__(self, files: dict[str, str | bytes]):
        self.files = files

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        for name, content in self.files.items():
            target = Path(save_directory) / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")


class Subfolder:
    """Objects saved into the subfolder `name` of the folder being written (e.g. a model inside a results folder)."""

    def __init__(self, name: str, *objects: SavesPretrained):
        self.name, self.objects = name, objects

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        target = Path(save_directory) / self.name
        target.mkdir()
        for obj in self.objects:
            obj.save_pretrained(target)


def save_pretrained_atomically(output_dir: str | os.PathLike, *objects: SavesPretrained) -> Path:
    """Save every object (model, tokenizer, ...) into `output_dir` as one step.

    Everything is written into a temporary folder next to `output_dir` and flushed to disk, then that folder replaces
    `output_dir` by renames: if anything fails or the process is interrupted midway, `output_dir` still holds its
    previous complete content (or does not exist).
    """
    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(output_dir, "tmp"), dir=output_dir.parent))
    os.chmod(staging, _default_mode(0o777))  # mkdtemp makes it private; the output folder gets the usual permissions
    try:
        for obj in objects:
            obj.save_pretrained(staging)
        _sync_tree(staging)
        _swap_in(staging, output_dir)
        _sync(output_dir.parent)
    finally:
        _remove(staging)  # nothing left once renamed
    return output_dir


def write_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file through a temporary sibling and a rename: readers never see half a file, and an existing file
    keeps its permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else _default_mode(0o666)
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        _sync(path.parent)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def output_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be written as an output folder (a file is in the way, or its parent is not writable), or
    None. Checked before long work, so that it fails at once rather than at the end."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write in {parent} (permission denied)"
    return None


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` (a folder, or nothing) by `staging`. Two renames; if the second one does not happen (an error,
    Ctrl-C), the first is undone, judged by what is on disk so that an interruption at any point is covered."""
    if not target.exists():
        os.replace(staging, target)
        return
    holder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target, "old"), dir=target.parent))
    previous = holder / target.name
    try:
        os.replace(target, previous)
        os.replace(staging, target)
    except BaseException:
        if previous.exists() and not target.exists():
            os.replace(previous, target)
        raise
    finally:
        if target.exists():  # else the previous folder is still in `holder`: the next write puts it back
            _remove(holder)


def _temporary_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def _recover(path: Path) -> None:
    """Clean up after writes to `path` by processes that were killed: put back a previous folder that was moved
    aside when `path` is missing, and delete their staging folders and files."""
    old, tmp = f".{path.name}.old-", f".{path.name}.tmp-"
    leftovers = [
        entry
        for entry in path.parent.iterdir()
        if entry.name.startswith((old, tmp)) and not _running(_writer(entry.name, path.name))
    ]
    for leftover in sorted(leftovers, key=lambda entry: not entry.name.startswith(old)):  # a previous folder first
        previous = leftover / path.name
        if not path.exists() and previous.is_dir() and leftover.name.startswith(old):
            os.replace(previous, path)
        _remove(leftover)


def _writer(leftover: str, name: str) -> int | None:
    """The process id in a staging name `.NAME.KIND-PID-XXXX` (None in a name without one)."""
    pid = leftover[len(name) + 6 :].split("-", 1)[0]  # after ".NAME.tmp-" / ".NAME.old-"
    return int(pid) if pid.isdigit() else None


def _running(pid: int | None) -> bool:
    """Whether process `pid` may still be running (and writing); True where that cannot be told."""
    if pid is None or pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _default_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _sync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so that the rename never publishes unwritten data."""
    for root, _, names in os.walk(folder):
        for name in names:
            _sync(Path(root) / name)
        _sync(Path(root))


def _sync(path: Path) -> None:
    if os.name != "posix":  # Windows cannot open folders for fsync
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
