"""`relformer-card`: (re)generate the model card (README.md) of a saved Relformer folder, from its config, its
weights' shapes and, for a converted folder, conversion.json, with the one renderer `hf_relformer.hub.model_card`.

    relformer-card FOLDER [--results results.json] [--license apache-2.0] [--dataset NAME] [--repo-id org/name]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from huggingface_hub import ModelCard

from hf_relformer.checkpoint import (
    CheckpointError,
    checkpoint_problems,
    folder_shapes,
    is_hub_name,
    load_relformer_config,
    read_json,
)
from hf_relformer.commands import run_command
from hf_relformer.model_card import CardError, conversion_card, model_card
from hf_relformer.saving import write_atomically


def count_parameters(folder: Path) -> int:
    """Number of stored parameters, read from the safetensors headers (no tensor is loaded)."""
    return sum(math.prod(shape) for shape in folder_shapes(folder).values())


def render_card(
    folder: str | Path,
    results: dict | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card of a saved Relformer folder, from its config and weights (a converted folder's conversion.json
    adds its verification, as the converter wrote it). A folder whose config or weights are missing, damaged or do
    not fit each other is a `CardError`."""
    folder = Path(folder)
    try:
        config = load_relformer_config(folder)
        problems = checkpoint_problems(config, folder_shapes(folder))
        if problems:
            raise CheckpointError(f"{folder / 'config.json'} does not fit the weights: {problems[0]}")
        conversion = read_json(folder / "conversion.json") if (folder / "conversion.json").exists() else {}
        parameters = count_parameters(folder)
    except CheckpointError as error:
        raise CardError(str(error)) from error
    common = dict(results=results, license=license, datasets=datasets, repo_id=repo_id)
    plots = [path.name for path in folder.glob("*.png")]
    if conversion:
        return conversion_card(config, parameters, conversion, plots=plots, **common)
    head = (config.architectures or ["RelformerModel"])[0]
    form = config.form
    summary = (
        f"{'An' if form.startswith('e') else 'A'} {form} [Relformer](https://pypi.org/project/hf-relformer/) "
        f"(`{head}`) with `{config.position_embedding_type}` positions."
    )
    return model_card(config, parameters, title=repo_id or folder.name, summary=summary, plots=plots, **common)


def write_card(folder: str | Path, **kwargs) -> Path:
    """Render and write `folder/README.md` (through a temporary file and a rename: an existing card stays whole)."""
    card = render_card(folder, **kwargs)
    path = Path(folder) / "README.md"
    try:
        return write_atomically(path, str(card))
    except OSError as error:
        raise CardError(f"cannot write {path}: {error}; the previous card, if any, is unchanged.") from error


def _read_json(path: Path) -> dict:
    try:
        return read_json(path)
    except CheckpointError as error:
        raise CardError(str(error)) from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relformer-card", description="(Re)generate the model card of a folder.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--results", type=Path, help="JSON of evaluation results (metric -> number)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--dataset", action="append", dest="datasets", help="a dataset id (repeatable)")
    parser.add_argument("--repo-id", help="the Hub repository the card will live in (used in the examples)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if args.results and not args.results.is_file():
        parser.error(f"--results {args.results} is not a file")
    if args.repo_id is not None and not is_hub_name(args.repo_id):
        parser.error(f"--repo-id must look like owner/name, got {args.repo_id!r}")

    def work() -> None:
        results = _read_json(args.results) if args.results else None
        path = write_card(
            args.folder, results=results, license=args.license, datasets=args.datasets, repo_id=args.repo_id
        )
        print(f"Wrote {path}")

    return run_command("relformer-card", work, (CardError,), f"{args.folder / 'README.md'} is unchanged.")


if __name__ == "__main__":
    raise SystemExit(main())
