"""The model card (README.md) written into every converted folder, from `hf_relformer/model_cards/conversion.md`."""

from __future__ import annotations

from pathlib import Path

import hf_relformer

from .common import Conversion, is_hub_name

TEMPLATE = Path(hf_relformer.__file__).parent / "model_cards" / "conversion.md"
AUTO_CLASSES = {
    "RelformerForCausalLM": ("AutoModelForCausalLM", "text-generation"),
    "RelformerForMaskedLM": ("AutoModelForMaskedLM", "fill-mask"),
    "RelformerModel": ("AutoModel", "feature-extraction"),
}


def render_card(conversion: Conversion, results: dict) -> str:
    config = conversion.model.config
    auto_class, pipeline_tag = AUTO_CLASSES.get(results["relformer_class"], ("AutoModel", "feature-extraction"))
    difference = results["max_abs_difference"]
    if difference is None:
        verification = "Not verified (converted with `--no-verify`)."
    elif results["positions_reinitialised"]:
        verification = (
            f"Positions were re-initialised as `{config.position_embedding_type}` for fine-tuning: the outputs differ "
            f"from the source's (max abs difference {difference:.3g}) until the model is fine-tuned."
        )
    else:
        verification = (
            f"The converted model and the source ran on the same sample inputs; the largest absolute difference of "
            f"`{results['compared_output']}` was **{difference:.3g}** (tolerance {results['tolerance']:g}, fp32)."
        )
    positions = config.position_embedding_type
    if positions == "relative":
        positions += f" (k = {config.relative_attention_max_distance})"
    return TEMPLATE.read_text(encoding="utf-8").format(
        pipeline_tag=pipeline_tag,
        base_model_line=f"base_model: {conversion.source_name}\n" if is_hub_name(conversion.source_name) else "",
        source_name=conversion.source_name,
        source=conversion.source,
        relformer_class=results["relformer_class"],
        form=config.form,
        positions=positions,
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        feed_forward=f"{config.feed_forward_type} {config.hidden_act}, {config.intermediate_size}",
        norm=f"{config.norm_type}, {config.layer_norm_position}",
        vocab_size=config.vocab_size,
        verification=verification,
        notes="".join(f"\n- {note}\n" for note in conversion.notes),
        auto_class=auto_class,
    )
