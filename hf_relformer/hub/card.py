"""Model cards for Relformer folders, rendered with huggingface_hub's `ModelCard` / `ModelCardData` (Jinja template
`hf_relformer/model_cards/relformer.md.jinja`): YAML metadata and a body for the folder's form.

    relformer-card FOLDER [--results results.json] [--license apache-2.0] [--dataset NAME] [--repo-id org/name]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

import hf_relformer
from hf_relformer.commands import run_command
from hf_relformer.modeling_relformer import checkpoint_problems
from hf_relformer.saving import write_atomically

from ..conversion.common import (
    ConversionError,
    folder_shapes,
    is_hub_name,
    load_relformer_config,
    read_json,
)

TEMPLATE = Path(hf_relformer.__file__).parent / "model_cards" / "relformer.md.jinja"
FORMS = {  # form -> (pipeline tag, Auto class of its main head)
    "decoder-only": ("text-generation", "AutoModelForCausalLM"),
    "encoder": ("feature-extraction", "AutoModel"),
    "encoder-decoder": ("text2text-generation", "AutoModelForSeq2SeqLM"),
}
HEAD_TAGS = {
    "RelformerForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "RelformerForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "RelformerForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
}


class CardError(ValueError):
    """The folder cannot be described: the message names the file at fault."""


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
    """The card of a saved Relformer folder, from its config (and `results`: metric name -> number; a
    `"model_index"` list of {task_type, dataset_type, dataset_name, metric_type, metric_value} becomes model-index).
    A folder whose config or weights are missing, damaged or do not fit each other is a `CardError`."""
    folder = Path(folder)
    try:
        config = load_relformer_config(folder)
        problems = checkpoint_problems(config, folder_shapes(folder))
        if problems:
            raise ConversionError(f"{folder / 'config.json'} does not fit the weights: {problems[0]}")
        conversion = read_json(folder / "conversion.json") if (folder / "conversion.json").exists() else {}
        parameters = count_parameters(folder)
    except ConversionError as error:
        raise CardError(str(error)) from error
    form = config.form
    head = (config.architectures or [""])[0]
    pipeline_tag, auto_class = HEAD_TAGS.get(head, FORMS[form])
    results = dict(results or {})
    try:
        eval_results = [EvalResult(**entry) for entry in results.pop("model_index", [])]
    except (TypeError, ValueError) as error:
        raise CardError(f"results: model_index must list {{task_type, dataset_type, ...}} objects: {error}") from error
    base_model = conversion.get("source_name") if is_hub_name(conversion.get("source_name", "")) else None
    name = repo_id or folder.name
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["relformer", "relative-position" if config.position_embedding_type == "relative" else "transformer"],
        license=license,
        datasets=datasets or None,
        base_model=base_model,
        model_name=name,
        eval_results=eval_results or None,
    )
    relative = config.position_embedding_type == "relative"
    summary = (
        f"A {form} [Relformer](https://pypi.org/project/hf-relformer/) (`{head or 'RelformerModel'}`) with "
        f"`{config.position_embedding_type}` positions"
        + (f", converted from `{conversion['source_name']}` ({conversion['source']})." if conversion else ".")
    )
    intended = (
        "Research and experiments with relative-position Transformers. It inherits the data, biases and licence of "
        "whatever it was trained or converted from; check those before use in production."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=name,
        summary=summary,
        form=form,
        positions=config.position_embedding_type,
        max_distance=config.relative_attention_max_distance if relative else "–",
        values="yes" if relative and config.relative_attention_values else "no",
        per_head="yes" if relative and config.relative_attention_per_head else "no",
        layers=f"{config.encoder_layers}+{config.decoder_layers}"
        if config.is_encoder_decoder
        else config.num_hidden_layers,
        hidden_size=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        feed_forward=f"{config.feed_forward_type} {config.hidden_act}, {config.intermediate_size}",
        vocab_size=config.vocab_size,
        parameters=f"{parameters:,}",
        repo_id=repo_id or "PATH",
        auto_class=auto_class,
        intended_use=intended,
        results={key: value for key, value in results.items() if isinstance(value, (int, float, str))},
        plots=sorted(path.name for path in folder.glob("*.png")),
    )


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
    except ConversionError as error:
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
