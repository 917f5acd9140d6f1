"""Reference outputs of transformers 4.x's own BERT with position_embedding_type="relative_key" / "relative_key_query".

transformers 5 removed those position types, so this script is run by the Python of the transformers 4.57.6 venv that
scripts/fetch_assets.sh installs ($RELFORMER_ASSETS/transformers4-venv/bin/python), in its own process. It imports
only torch, transformers 4.x, safetensors and the standard library (not hf_relformer, nothing from tests/).

    python tests/transformers4_bert_relative.py OUTPUT_DIR --position-embedding-type relative_key|relative_key_query \
        [--seed 0] [--head masked-lm|base]

It writes
    OUTPUT_DIR/model/                   a small random BertForMaskedLM (or BertModel for --head base), save_pretrained
                                        with safetensors;
    OUTPUT_DIR/reference.safetensors    input_ids, token_type_ids, attention_mask (int64), last_hidden_state and
                                        logits (masked-lm) or pooler_output (base) (fp32), from that model in eval mode;
                                        its metadata holds the transformers version, position type, head and seed.
Row 1 of the batch has its last PAD_LENGTH positions padded; their outputs are written too (v4 computes them like any
other query), but a comparison should normally look at the unpadded positions only.
"""

import argparse
import copy
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertModel
from transformers.models.bert.modeling_bert import BertSelfAttention

BATCH_SIZE, SEQ_LENGTH, PAD_LENGTH = 2, 20, 5
CONFIG = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=24,
    type_vocab_size=2,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=0,
)


@torch.no_grad()
def redraw_parameters(model: torch.nn.Module, seed: int) -> None:
    """At the default init (std 0.02) the outputs are nearly constant, so a wrong relative-position implementation
    could still match. Redraw every parameter (tied ones once) under torch.manual_seed(seed), as normal noise of
    std: Linear weights 1/sqrt(fan_in); distance_embedding 1 (relative scores as large as the content ones); the
    other embeddings 0.5 (logits std about 3); LayerNorm weights 1 + noise of std 0.1; every bias 0.1.
    A flat std 0.3 for every matrix was tried and rejected: the FFN output matrix then maps GELU's positive mean to one
    vector shared by every position, which dominated the hidden states (position-to-position std 0.25 against 1.0
    within a position; the masked-LM argmax was the same token at all 20 positions of a row)."""
    torch.manual_seed(seed)
    layer_norm_weights = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.LayerNorm)}
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        noise = torch.randn_like(parameter)
        if id(parameter) in layer_norm_weights:
            parameter.copy_(1.0 + 0.1 * noise)
        elif name.endswith("distance_embedding.weight"):
            parameter.copy_(noise)
        elif parameter.dim() > 1 and "embeddings" in name:
            parameter.copy_(0.5 * noise)
        elif parameter.dim() > 1:
            parameter.copy_(noise / parameter.shape[1] ** 0.5)
        else:
            parameter.copy_(0.1 * noise)


def make_inputs(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(1, CONFIG["vocab_size"], (BATCH_SIZE, SEQ_LENGTH), generator=generator)
    token_type_ids = torch.zeros(BATCH_SIZE, SEQ_LENGTH, dtype=torch.long)
    token_type_ids[0, SEQ_LENGTH // 2 :] = 1
    token_type_ids[1, 6 : SEQ_LENGTH - PAD_LENGTH] = 1
    attention_mask = torch.ones(BATCH_SIZE, SEQ_LENGTH, dtype=torch.long)
    attention_mask[1, -PAD_LENGTH:] = 0
    input_ids[1, -PAD_LENGTH:] = CONFIG["pad_token_id"]
    token_type_ids[1, -PAD_LENGTH:] = 0
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


@torch.no_grad()
def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    if head == "masked-lm":
        outputs = model(**inputs, output_hidden_states=True)
        return {"last_hidden_state": outputs.hidden_states[-1], "logits": outputs.logits}
    outputs = model(**inputs)
    return {"last_hidden_state": outputs.last_hidden_state, "pooler_output": outputs.pooler_output}


def check_relative_path(model: torch.nn.Module, inputs, head: str, reference, position_embedding_type: str) -> float:
    """Fail unless every layer runs the eager BertSelfAttention with distance_embedding and that embedding matters."""
    base = model.bert if head == "masked-lm" else model
    for layer in base.encoder.layer:
        attention = layer.attention.self
        if type(attention) is not BertSelfAttention:  # the SDPA subclass would fall back to it, but be exact
            raise SystemExit(f"error: expected eager BertSelfAttention, got {type(attention).__name__}")
        if attention.position_embedding_type != position_embedding_type:
            raise SystemExit(f"error: attention uses {attention.position_embedding_type!r}")
        expected = (2 * CONFIG["max_position_embeddings"] - 1, CONFIG["hidden_size"] // CONFIG["num_attention_heads"])
        if tuple(attention.distance_embedding.weight.shape) != expected:
            raise SystemExit(f"error: distance_embedding has shape {tuple(attention.distance_embedding.weight.shape)}")
    if base.embeddings.position_embedding_type != position_embedding_type:
        raise SystemExit("error: the embeddings would add absolute positions")
    ablated = copy.deepcopy(model)
    ablated_base = ablated.bert if head == "masked-lm" else ablated
    with torch.no_grad():
        for layer in ablated_base.encoder.layer:
            layer.attention.self.distance_embedding.weight.zero_()
    change = (run(ablated, inputs, head)["last_hidden_state"] - reference["last_hidden_state"]).abs().max().item()
    if not change > 0.1:
        raise SystemExit(f"error: zeroing distance_embedding changes last_hidden_state by only {change:.3g}")
    return change


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--position-embedding-type", required=True, choices=["relative_key", "relative_key_query"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head", choices=["masked-lm", "base"], default="masked-lm")
    args = parser.parse_args(argv)
    if not transformers.__version__.startswith("4."):
        raise SystemExit(
            f"error: needs transformers 4.x (got {transformers.__version__} from {transformers.__file__}); run it "
            "with assets/transformers4-venv/bin/python (installed by scripts/fetch_assets.sh)"
        )

    config = BertConfig(**CONFIG, position_embedding_type=args.position_embedding_type)
    config._attn_implementation = "eager"
    torch.manual_seed(args.seed)
    model = (BertForMaskedLM if args.head == "masked-lm" else BertModel)(config)
    redraw_parameters(model, args.seed)
    model.eval()

    inputs = make_inputs(args.seed)
    reference = run(model, inputs, args.head)
    change = check_relative_path(model, inputs, args.head, reference, args.position_embedding_type)

    for name, value in reference.items():
        if not torch.isfinite(value).all():
            raise SystemExit(f"error: {name} is not finite")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir / "model", safe_serialization=True)
    tensors = {**inputs, **{name: value.float() for name, value in reference.items()}}
    metadata = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "position_embedding_type": args.position_embedding_type,
        "head": args.head,
        "seed": str(args.seed),
    }
    save_file(
        {name: value.contiguous() for name, value in tensors.items()},
        str(args.output_dir / "reference.safetensors"),
        metadata=metadata,
    )
    print(
        f"transformers {transformers.__version__} (torch {torch.__version__}): BERT {args.head} "
        f"{args.position_embedding_type}, seed {args.seed}; last_hidden_state std "
        f"{reference['last_hidden_state'].std().item():.3f}, zeroing distance_embedding moves it by up to "
        f"{change:.3f}; wrote {args.output_dir}"
    )


if __name__ == "__main__":
    main()
