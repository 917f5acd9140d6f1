"""Writing model folders so that nothing is ever half-written: build in a temporary sibling, then rename."""

import os
import shutil
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


def save_pretrained_atomically(output_dir: str | os.PathLike, *objects: SavesPretrained) -> Path:
    """Save every object (model, tokenizer, ...) into `output_dir` as one step.

    Everything is written into a temporary folder next to `output_dir`, which then replaces it by renames: if the
    process dies midway, `output_dir` still holds its previous complete content (or does not exist).
    """
    output_dir = Path(output_dir).resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the output folder gets the usual permissions
    try:
        for obj in objects:
            obj.save_pretrained(staging)
        if output_dir.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, previous / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def write_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one file through a temporary sibling and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path
