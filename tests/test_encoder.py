"""Encoder-only Relformer and its heads: bidirectional under SDPA, padding-invariant, eager == SDPA, every head's
loss against a hand computation, decoder-only sequence classification pooling, pipelines by path."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from hf_relformer import (
    RelformerForMaskedLM,
    RelformerForSequenceClassification,
    RelformerForTokenClassification,
    RelformerModel,
)
from hf_relformer.saving import save_pretrained_atomically

from helpers import SCHEMES, SDPA_SCHEMES, redraw_weights, skip_without_encoder, tiny_config

IDS = torch.tensor([[5, 17, 33, 8, 41, 12, 7, 19], [9, 23, 4, 50, 3, 0, 0, 0]])
MASK = (IDS != 0).long()


def encoder(head=RelformerModel, scheme="relative", seed=0, **overrides):
    skip_without_encoder(scheme)
    torch.manual_seed(seed)
    return redraw_weights(head(tiny_config(**SCHEMES[scheme], is_decoder=False, **overrides)), seed=seed)


@pytest.mark.parametrize("scheme", SDPA_SCHEMES)
def test_sdpa_encoder_is_bidirectional_and_equals_eager(scheme):
    eager, sdpa = (encoder(scheme=scheme, attn_implementation=impl) for impl in ("eager", "sdpa"))
    with torch.no_grad():
        # no padding: the SDPA mask is None, and is_causal must still be False (the guide's trap)
        torch.testing.assert_close(sdpa(IDS[:1]).last_hidden_state, eager(IDS[:1]).last_hidden_state)
        real = MASK.bool()
        torch.testing.assert_close(
            sdpa(IDS, attention_mask=MASK).last_hidden_state[real],
            eager(IDS, attention_mask=MASK).last_hidden_state[real],
        )
        changed = IDS[:1].clone()
        changed[0, -1] = 60
        first_token_moves = sdpa(changed).last_hidden_state[0, 0] - sdpa(IDS[:1]).last_hidden_state[0, 0]
    assert first_token_moves.abs().max() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_padding_does_not_change_real_tokens(scheme, side):
    model = encoder(scheme=scheme)
    row = IDS[1:, :5]
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded = torch.cat([row, pad] if side == "right" else [pad, row], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(row).last_hidden_state
        batch = model(torch.cat([IDS[:1], padded]), attention_mask=torch.cat([MASK[:1], mask])).last_hidden_state
    torch.testing.assert_close(batch[1][mask[0].bool()], alone[0], atol=1e-5, rtol=1e-5)


def test_masked_lm_loss_by_hand():
    model = encoder(RelformerForMaskedLM, scheme="relative_values")
    labels = torch.full_like(IDS, -100)
    labels[0, 2], labels[1, 1] = 33, 23
    out = model(IDS, attention_mask=MASK, labels=labels)
    log_probs = out.logits.log_softmax(-1)
    torch.testing.assert_close(out.loss, -(log_probs[0, 2, 33] + log_probs[1, 1, 23]) / 2)
    assert model.lm_head.decoder.weight is model.model.embed_tokens.weight  # tied


@pytest.mark.parametrize(
    ("problem_type", "num_labels", "labels"),
    [
        ("single_label_classification", 3, torch.tensor([2, 0])),
        ("regression", 1, torch.tensor([0.5, -1.5])),
        ("multi_label_classification", 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ],
)
def test_sequence_classification_loss_by_hand(problem_type, num_labels, labels):
    model = encoder(RelformerForSequenceClassification, num_labels=num_labels, problem_type=problem_type)
    out = model(IDS, attention_mask=MASK, labels=labels)
    logits = out.logits
    if problem_type == "single_label_classification":
        expected = -(logits.log_softmax(-1)[0, 2] + logits.log_softmax(-1)[1, 0]) / 2
    elif problem_type == "regression":
        expected = ((logits.squeeze(-1) - labels) ** 2).mean()
    else:
        p = torch.sigmoid(logits)
        expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    torch.testing.assert_close(out.loss, expected)
    with torch.no_grad():  # the encoder pools the first token through dense + tanh
        hidden = model.model(IDS, attention_mask=MASK).last_hidden_state
        pooled = torch.tanh(model.pooler(hidden[:, 0]))
    torch.testing.assert_close(model.classifier(pooled), logits.detach())


def test_decoder_only_sequence_classification_pools_the_last_real_token():
    torch.manual_seed(0)
    model = redraw_weights(RelformerForSequenceClassification(tiny_config(num_labels=2)))
    assert model.pooler is None
    row = torch.tensor([[5, 17, 33, 8]])
    with torch.no_grad():
        alone = model(row).logits
        right = model(torch.tensor([[5, 17, 33, 8, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
        left = model(torch.tensor([[0, 0, 5, 17, 33, 8]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]])).logits
        by_pad_id = model(torch.tensor([[5, 17, 33, 8, 0, 0]])).logits  # no mask: padding found from pad_token_id
    for other in (right, left, by_pad_id):
        torch.testing.assert_close(other, alone, atol=1e-5, rtol=1e-5)


def test_token_classification_loss_by_hand():
    model = encoder(RelformerForTokenClassification, num_labels=4)
    labels = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [3, 2, 1, 0, 1, -100, -100, -100]])
    out = model(IDS, attention_mask=MASK, labels=labels)
    log_probs = out.logits.log_softmax(-1)
    terms = [-log_probs[b, t, labels[b, t]] for b in range(2) for t in range(8) if labels[b, t] >= 0]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())


def test_heads_refuse_other_forms():
    for head in (RelformerForMaskedLM, RelformerForTokenClassification):
        with pytest.raises(ValueError, match=f"{head.__name__} needs an encoder config"):
            head(tiny_config())
    with pytest.raises(ValueError, match="RelformerForSequenceClassification needs an encoder config"):
        RelformerForSequenceClassification(tiny_config(is_encoder_decoder=True))


@pytest.fixture(scope="module")
def encoder_folders(minilm_path, tmp_path_factory):
    """Each head saved by path with the real MiniLM WordPiece tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    root = tmp_path_factory.mktemp("encoders")
    config = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
              "eos_token_id": None}  # fmt: skip
    labels = {"id2label": {0: "negative", 1: "positive"}}
    folders = {}
    for name, head, extra in [
        ("mlm", RelformerForMaskedLM, {}),
        ("cls", RelformerForSequenceClassification, labels),
        ("tok", RelformerForTokenClassification, {"id2label": {0: "O", 1: "B-X", 2: "I-X"}}),
        ("base", RelformerModel, {}),
    ]:
        folders[name] = save_pretrained_atomically(root / name, encoder(head, **config, **extra), tokenizer)
    return folders, tokenizer


TEXT = "relative positions let attention see [MASK] far apart tokens are."


def test_pipelines_by_path(encoder_folders):
    folders, tokenizer = encoder_folders
    inputs = tokenizer(TEXT, return_tensors="pt")
    mask_index = inputs.input_ids[0].tolist().index(tokenizer.mask_token_id)

    fill_mask = pipeline("fill-mask", model=str(folders["mlm"]))
    assert type(fill_mask.model).__name__ == "RelformerForMaskedLM"
    fill = fill_mask(TEXT, top_k=3)
    mlm = RelformerForMaskedLM.from_pretrained(folders["mlm"])
    with torch.no_grad():
        logits = mlm(**inputs).logits[0, mask_index]
    assert [r["token"] for r in fill] == logits.topk(3).indices.tolist()

    classify = pipeline("text-classification", model=str(folders["cls"]))(TEXT, top_k=None)
    cls = RelformerForSequenceClassification.from_pretrained(folders["cls"])
    with torch.no_grad():
        probs = cls(**inputs).logits.softmax(-1)[0]
    assert {r["label"]: round(r["score"], 5) for r in classify} == {
        "negative": round(probs[0].item(), 5),
        "positive": round(probs[1].item(), 5),
    }

    tags = pipeline("token-classification", model=str(folders["tok"]))(TEXT)
    assert all(tag["entity"] in {"O", "B-X", "I-X"} for tag in tags)

    features = pipeline("feature-extraction", model=str(folders["base"]))(TEXT, return_tensors=True)
    base = RelformerModel.from_pretrained(folders["base"])
    with torch.no_grad():
        torch.testing.assert_close(features, base(**inputs).last_hidden_state)


def test_sentence_pairs_through_the_text_classification_pipeline(encoder_folders):
    """BERT-style tokenizers mark the second segment with token_type_ids of 1: encoders have BERT's two segments by
    default, and the pair's logits depend on where the second segment starts."""
    folders, tokenizer = encoder_folders
    first, second = "the film is long", "but never dull"
    pair = tokenizer(first, second, return_tensors="pt")
    assert pair.token_type_ids.max() == 1
    classify = pipeline("text-classification", model=str(folders["cls"]))
    got = classify({"text": first, "text_pair": second}, top_k=None)
    cls = RelformerForSequenceClassification.from_pretrained(folders["cls"])
    assert cls.config.type_vocab_size == 2
    with torch.no_grad():
        probs = cls(**pair).logits.softmax(-1)[0]
        one_segment = cls(**{**pair, "token_type_ids": torch.zeros_like(pair.token_type_ids)}).logits.softmax(-1)[0]
    assert {r["label"]: round(r["score"], 5) for r in got} == {
        "negative": round(probs[0].item(), 5),
        "positive": round(probs[1].item(), 5),
    }
    assert not torch.allclose(probs, one_segment)


REMOTE_PIPELINES = """
import json, sys
sys.modules["hf_relformer"] = None  # as on a machine where the package is not installed
from transformers import pipeline
folders, text = json.loads(sys.argv[1]), sys.argv[2]
def run(task, name):
    return pipeline(task, model=folders[name], trust_remote_code=True)
out = {
    "fill-mask": [r["token"] for r in run("fill-mask", "mlm")(text, top_k=3)],
    "text-classification": run("text-classification", "cls")(text)[0],
    "token-classification": len(run("token-classification", "tok")(text)),
    "feature-extraction": run("feature-extraction", "base")(text)[0][0][:4],
}
print(json.dumps(out))
"""


def test_pipelines_by_path_with_remote_code_in_a_fresh_process(encoder_folders, tmp_path):
    folders, _ = encoder_folders
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    paths = json.dumps({name: str(path) for name, path in folders.items()})
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_PIPELINES, paths, TEXT], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    local = {
        "fill-mask": [r["token"] for r in pipeline("fill-mask", model=str(folders["mlm"]))(TEXT, top_k=3)],
        "text-classification": pipeline("text-classification", model=str(folders["cls"]))(TEXT)[0],
        "token-classification": len(pipeline("token-classification", model=str(folders["tok"]))(TEXT)),
        "feature-extraction": pipeline("feature-extraction", model=str(folders["base"]))(TEXT)[0][0][:4],
    }
    assert remote["fill-mask"] == local["fill-mask"]
    assert remote["text-classification"]["label"] == local["text-classification"]["label"]
    assert remote["token-classification"] == local["token-classification"]
    assert remote["feature-extraction"] == pytest.approx(local["feature-extraction"], abs=1e-5)
