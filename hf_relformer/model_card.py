"""The one model card renderer. Every card (`relformer-card`, `relformer-upload --write-card`, the converters, the
demo, the examples, `scripts/render_model_cards.py`) is `model_card(...)` on the Jinja template `relformer.md.jinja`
of `hf_relformer.model_cards` (the top-level model_cards/ folder), with huggingface_hub's `ModelCard` /
`ModelCardData` for the YAML metadata. What differs between sources comes in as data: `sections` ((heading,
markdown) pairs: a conversion's verification, an example's results), `results` (metric -> number), `usage` (a code
snippet), `tags`. It reads no folder: `hf_relformer.hub.card` renders a saved folder's card with it."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

from hf_relformer.checkpoint import AUTO_CLASS_OF_FORM, MODEL_CODE, is_hub_name
from hf_relformer.configuration_relformer import RelformerConfig

TEMPLATE = "relformer.md.jinja"  # in the package hf_relformer.model_cards (the top-level model_cards/ folder)
PIPELINE_TAGS = {
    "decoder-only": "text-generation",
    "encoder": "feature-extraction",
    "encoder-decoder": "text2text-generation",
}
FORMS = {form: (tag, AUTO_CLASS_OF_FORM[form]) for form, tag in PIPELINE_TAGS.items()}  # form -> (tag, Auto class)
HEAD_TAGS = {
    "RelformerForMaskedLM": ("fill-mask", "AutoModelForMaskedLM"),
    "RelformerForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification"),
    "RelformerForTokenClassification": ("token-classification", "AutoModelForTokenClassification"),
}
INTENDED_USE = (
    "Research and experiments with relative-position Transformers. It inherits the data, biases and licence of "
    "whatever it was trained or converted from; check those before use in production."
)


class CardError(ValueError):
    """The card cannot be rendered: the message names the file or field at fault."""


def template_text(name: str = TEMPLATE) -> str:
    """A card template, read through the installed package `hf_relformer.model_cards`."""
    return resources.files("hf_relformer.model_cards").joinpath(name).read_text(encoding="utf-8")


def layers_of(config: RelformerConfig) -> str:
    """The layer count as a card shows it: an encoder-decoder's encoder and decoder layers, else the stack's."""
    if config.is_encoder_decoder:
        return f"{config.encoder_layers} encoder + {config.decoder_layers} decoder"
    return str(config.num_hidden_layers)


def count_parameters_of(model_class: type[PreTrainedModel], config: RelformerConfig) -> int:
    """Parameters of a fresh `model_class(config)` (tied weights once), built on the meta device: nothing is
    allocated, so a card can be rendered from a config alone."""
    with torch.device("meta"):
        return model_class(config).num_parameters()


def model_card(
    config: RelformerConfig,
    parameters: int,
    *,
    title: str,
    summary: str,
    sections: Iterable[tuple[str, str]] = (),
    usage: str | None = None,
    results: dict | None = None,
    plots: Iterable[str] = (),
    tags: Iterable[str] = (),
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    intended_use: str = INTENDED_USE,
) -> ModelCard:
    """The card of a Relformer with `config` and `parameters`: metadata, the architecture table, `sections`
    ((heading, markdown) pairs, in order), how to use it (`usage`, else the snippet of its form), `intended_use`,
    `results` (metric name -> number; a `"model_index"` list of {task_type, dataset_type, dataset_name,
    metric_type, metric_value} becomes model-index) and `plots` (image files beside the card)."""
    form = config.form
    head = (config.architectures or [""])[0]
    pipeline_tag, auto_class = HEAD_TAGS.get(head, FORMS[form])
    results = dict(results or {})
    try:
        eval_results = [EvalResult(**entry) for entry in results.pop("model_index", [])]
    except (TypeError, ValueError) as error:
        raise CardError(f"results: model_index must list {{task_type, dataset_type, ...}} objects: {error}") from error
    scheme = config.position_scheme
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["relformer", "relative-position" if scheme.translation_invariant else "transformer", *tags],
        license=license,
        datasets=datasets or None,
        base_model=base_model,
        model_name=repo_id or title,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=template_text(),
        title=title,
        summary=summary,
        form=form,
        positions=config.position_embedding_type,
        position_settings=scheme.card_settings(config),
        code_files=", ".join(f"`{name}`" for name in MODEL_CODE),
        layers=layers_of(config),
        hidden_size=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_size=config.head_dim,
        feed_forward=f"{config.feed_forward_type} {config.hidden_act}, {config.intermediate_size}",
        norm=f"{config.norm_type}, {config.layer_norm_position}",
        vocab_size=config.vocab_size,
        parameters=f"{parameters:,}",
        sections=list(sections),
        usage=usage,
        repo_id=repo_id or "PATH",
        auto_class=auto_class,
        intended_use=intended_use,
        results={key: value for key, value in results.items() if isinstance(value, (int, float, str))},
        plots=sorted(plots),
    )


def conversion_card(config: RelformerConfig, parameters: int, conversion: dict, **kwargs) -> ModelCard:
    """The card of a converted checkpoint; `conversion` is what the converter writes to conversion.json (source,
    source_name, relformer_class, compared_output, max_abs_difference, tolerance, positions_reinitialised, notes):
    its verification becomes a section."""
    source, source_name = conversion.get("source", "?"), conversion.get("source_name", "?")
    difference = conversion.get("max_abs_difference")
    if difference is None:
        verification = "Not verified (converted with `--no-verify`)."
    elif conversion.get("positions_reinitialised"):
        verification = (
            f"Positions were re-initialised as `{config.position_embedding_type}` for fine-tuning: the outputs differ "
            f"from the source's (max abs difference {difference:.3g}) until the model is fine-tuned."
        )
    else:
        verification = (
            f"The converted model and the source ran on the same sample inputs; the largest absolute difference of "
            f"`{conversion.get('compared_output')}` was **{difference:.3g}** (tolerance "
            f"{conversion.get('tolerance', 0):g}, fp32)."
        )
    notes = "".join(f"\n\n- {note}" for note in conversion.get("notes", []))
    relformer_class = conversion.get("relformer_class") or (config.architectures or ["RelformerModel"])[0]
    summary = (
        f"This checkpoint is `{source_name}` (a `{source}` checkpoint) converted to a "
        f"[Relformer](https://pypi.org/project/hf-relformer/) `{relformer_class}` by `relformer-convert {source}`. "
        "The conversion changes no behaviour beyond the floating-point differences reported below."
    )
    kwargs.setdefault("base_model", source_name if is_hub_name(source_name) else None)
    return model_card(
        config,
        parameters,
        title=f"{source_name}, converted to Relformer",
        summary=summary,
        sections=[("Verification", verification + notes), *kwargs.pop("sections", ())],
        tags=["converted", *kwargs.pop("tags", ())],
        **kwargs,
    )
