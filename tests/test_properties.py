"""Property-based tests (hypothesis) over small random configs and inputs: the fast attention paths equal the naive
Shaw reference, cached decoding equals the full forward, left padding changes no real token, relative schemes ignore
absolute offsets (absolute schemes do not), and save/load round trips are exact.

Every model has large random weights (`helpers.redraw_weights`): at the default init all outputs look alike and these
properties could not fail. Runs are derandomized, so CI sees the same examples every time.
"""

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)

from hf_relformer import (
    RelformerForCausalLM,
    RelformerForConditionalGeneration,
    RelformerForMaskedLM,
    RelformerForSequenceClassification,
    RelformerForTokenClassification,
    RelformerModel,
    attention_relformer,
)
from hf_relformer.modeling_relformer import cache_of
from hf_relformer.positions_relformer import DistanceGrid, RotaryPositions

from helpers import (
    SCHEMES,
    assert_attention_matches_naive,
    redraw_weights,
    scheme_of,
    skip_without_encoder,
    tiny_config,
)

VOCAB = 64  # tiny_config's vocabulary; ids 0-2 are pad, bos, eos
PAD = 0
MAX_LENGTH = 12
OFFSET_FREE_SCHEMES = [name for name in SCHEMES if scheme_of(name).translation_invariant]  # see distances only
ABSOLUTE_SCHEMES = [name for name in SCHEMES if scheme_of(name).absolute]
# The forms a config can take, and the model class whose outputs the logit properties compare.
FORMS = ("decoder", "encoder", "seq2seq")
LM_CLASSES = {
    "decoder": RelformerForCausalLM,
    "encoder": RelformerForMaskedLM,
    "seq2seq": RelformerForConditionalGeneration,
}
# Every class a checkpoint of each form is saved from, with the Auto class that must load it back.
AUTO_CLASSES = {
    "decoder": [
        (RelformerForCausalLM, AutoModelForCausalLM),
        (RelformerForSequenceClassification, AutoModelForSequenceClassification),
        (RelformerModel, AutoModel),
    ],
    "encoder": [
        (RelformerForMaskedLM, AutoModelForMaskedLM),
        (RelformerForSequenceClassification, AutoModelForSequenceClassification),
        (RelformerForTokenClassification, AutoModelForTokenClassification),
        (RelformerModel, AutoModel),
    ],
    "seq2seq": [(RelformerForConditionalGeneration, AutoModelForSeq2SeqLM), (RelformerModel, AutoModel)],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The tensors here are tiny: intra-op threads only add overhead (ten times the run time on a busy 2-core
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fast(max_examples: int) -> settings:
    """Few examples (the tests are parametrized over schemes and forms), no per-example deadline (the first example
    pays for warm-up), and the same examples on every run."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def architectures(draw: st.DrawFn, scheme: str, form: str) -> dict:
    """Config overrides for a random tiny architecture of `scheme` in `form` (norms, gating, GQA, head size, ...)."""
    heads = draw(st.sampled_from((1, 2, 4)))
    hidden = draw(st.sampled_from((16, 32)))
    values = {
        **SCHEMES[scheme],
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": draw(st.sampled_from([n for n in (1, 2, 4) if heads % n == 0])),
        "head_dim": draw(st.sampled_from((None, 4, 8))),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "layer_norm_position": draw(st.sampled_from(("pre", "post"))),
        "norm_type": draw(st.sampled_from(("layer_norm", "rms_norm"))),
        "final_layer_norm": draw(st.sampled_from((None, True, False))),
        "feed_forward_type": draw(st.sampled_from(("plain", "gated"))),
        "hidden_act": draw(st.sampled_from(("gelu", "silu", "relu"))),
        "attention_bias": draw(st.booleans()),
        "mlp_bias": draw(st.booleans()),
        "scale_embedding": draw(st.booleans()),
        "embedding_layer_norm": draw(st.booleans()),
        "type_vocab_size": draw(st.sampled_from((0, 2))),
        "tie_word_embeddings": draw(st.booleans()),
        "is_decoder": form != "encoder",
    }
    if "relative_attention_max_distance" not in SCHEMES[scheme]:  # t5 keeps its own (above its exact buckets)
        values["relative_attention_max_distance"] = draw(st.integers(1, 5))
    if form == "seq2seq":
        values.update(
            is_encoder_decoder=True,
            encoder_layers=draw(st.integers(1, 2)),
            decoder_layers=draw(st.integers(1, 2)),
            decoder_start_token_id=1,
        )
    if not values.get("relative_attention_values"):  # relative values run eager attention only
        values["attn_implementation"] = draw(st.sampled_from(("eager", "sdpa")))
    key_query = "relative_attention_key_query" in scheme_of(scheme).switches
    if key_query and form == "encoder" and values["num_key_value_heads"] == heads:
        values["relative_attention_key_query"] = draw(st.booleans())
    if scheme == "rotary":
        values["rope_parameters"] = draw(
            st.sampled_from(
                (
                    {"rope_type": "default", "rope_theta": 10000.0},
                    {"rope_type": "default", "rope_theta": 100.0},
                    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                )
            )
        )
    return values


def build(model_class: type[PreTrainedModel], overrides: dict, seed: int) -> PreTrainedModel:
    """A model of `model_class` with these config overrides and large random weights, in eval mode."""
    if overrides.get("is_decoder") is False:
        skip_without_encoder(overrides.get("position_embedding_type", "relative"))
    torch.manual_seed(seed)
    return redraw_weights(model_class(tiny_config(**overrides)), seed=seed)


def token_ids(draw: st.DrawFn, batch: int, length: int) -> torch.Tensor:
    """`[batch, length]` random non-special token ids."""
    rows = st.lists(st.integers(3, VOCAB - 1), min_size=length, max_size=length)
    return torch.tensor(draw(st.lists(rows, min_size=batch, max_size=batch)))


def pad_rows(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id rows -> `[B, L]` ids and mask, each row padded on `side` to the longest row."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, where], mask[i, where] = row, 1
    return ids, mask


@st.composite
def padded_batches(
    draw: st.DrawFn, side: str, max_length: int = MAX_LENGTH
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """1-3 rows of 1..max_length random tokens: (rows, padded ids, mask)."""
    lengths = draw(st.lists(st.integers(1, max_length), min_size=1, max_size=3))
    rows = [token_ids(draw, 1, length)[0] for length in lengths]
    return (rows, *pad_rows(rows, side))


@contextmanager
def attention_blocks(rows: int | None, index_per_block: bool) -> Iterator[None]:
    """Force `in_query_blocks` to split the queries into blocks of `rows` query rows (None: the defaults, one block
    for these short inputs); `index_per_block` builds the bucket index per block instead of slicing a whole one."""
    with pytest.MonkeyPatch.context() as patch:
        if rows is not None:
            patch.setattr(attention_relformer, "BLOCK_ELEMENTS", 1)  # block rows = min(MIN_BLOCK_ROWS, Lq)
            patch.setattr(attention_relformer, "MIN_BLOCK_ROWS", rows)
        if index_per_block:
            patch.setattr(DistanceGrid, "WHOLE_LIMIT", 0)
        yield


def blocks() -> st.SearchStrategy[tuple[int | None, bool]]:
    """Arguments of `attention_blocks`."""
    return st.tuples(st.sampled_from((None, 1, 2, 3)), st.booleans())


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**16)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """fp32 logits computed in two ways (with a cache, padded, in blocks, rotated at other positions) agree to 1e-4 of
    their largest magnitude. With weights of std 0.5 logits reach 1e3 and fp32 rounding grows with them: over ~700
    examples the gap was at most 1.4e-5 of that scale, and 1e-14 when the same models run in float64."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=0.0, msg=(lambda m: msg + m) if msg else None)


def lm_logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """Logits of a causal or masked LM on `ids`, or of a seq2seq model with `ids` as its decoder input (the source
    and its mask in `kwargs`)."""
    if model.config.is_encoder_decoder:
        kwargs = {"decoder_input_ids": ids, "decoder_attention_mask": mask, **kwargs}
    else:
        kwargs = {"input_ids": ids, "attention_mask": mask, **kwargs}
    with torch.no_grad():
        return model(**kwargs).logits


# ---------------------------------------------------------------------------------------------------------------
# 1. Fast attention paths == the naive Shaw reference
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw: st.DrawFn, causal: bool, values: bool) -> dict:
    """A relative-attention layer config, hidden states, cache offset and padding mask for the naive comparison."""
    heads = draw(st.sampled_from((1, 2, 4)))
    kv_heads = draw(st.sampled_from([n for n in (1, 2, 4) if heads % n == 0]))
    overrides = {
        "is_decoder": causal,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": draw(st.sampled_from((None, 4, 8))),
        "relative_attention_max_distance": draw(st.integers(1, 6)),
        "relative_attention_values": values,
        "relative_attention_per_head": draw(st.booleans()),
        "relative_attention_key_query": not causal and kv_heads == heads and draw(st.booleans()),
        "attn_implementation": "eager" if values else draw(st.sampled_from(("eager", "sdpa"))),
    }
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, MAX_LENGTH))
    past = draw(st.integers(0, length - 1)) if causal else 0
    padding = draw(st.sampled_from(("none", "ones", "left", "any")))
    mask = None if padding == "none" else torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        if padding == "left":
            mask[row, : draw(st.integers(0, length - 1))] = 0
        elif padding == "any":
            real = draw(st.lists(st.booleans(), min_size=length, max_size=length).filter(any))
            mask[row] = torch.tensor(real)
    return {"overrides": overrides, "batch": batch, "length": length, "past": past, "mask": mask}


@pytest.mark.parametrize("values", [False, True], ids=["keys", "keys+values"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@fast(40)
@given(data=st.data(), blocking=blocks(), seed=seeds())
def test_attention_fast_paths_equal_naive_shaw(
    causal: bool, values: bool, data: st.DataObject, blocking: tuple[int | None, bool], seed: int
) -> None:
    """Shaw attention of layer 0 (keys / keys+values, shared / per-head tables, key_query, causal / bidirectional,
    GQA, eager / SDPA, k below and above the length, whole or in tiny blocks, with padding and a cache offset)
    equals `naive_shaw_attention`."""
    case = data.draw(attention_cases(causal, values))
    model = build(RelformerModel, case["overrides"], seed)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(case["batch"], case["length"], model.config.hidden_size, generator=generator)
    with attention_blocks(*blocking), torch.no_grad():
        assert_attention_matches_naive(model, hidden, case["past"], case["mask"])


# ---------------------------------------------------------------------------------------------------------------
# 2. Cached decoding == the full forward
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@fast(12)
@given(data=st.data(), blocking=blocks(), seed=seeds())
def test_cached_decoding_equals_full_forward(
    scheme: str, data: st.DataObject, blocking: tuple[int | None, bool], seed: int
) -> None:
    """Decoder-only, every scheme: logits of a prefill then token-by-token decoding with the cache equal those of one
    full forward, at every real position of a randomly left-padded batch."""
    model = build(RelformerForCausalLM, data.draw(architectures(scheme, "decoder")), seed)
    _, ids, mask = data.draw(padded_batches("left"))
    length = ids.shape[1]
    prefill = data.draw(st.integers(1, length), label="prefill")
    with attention_blocks(*blocking):
        full = lm_logits(model, ids, mask)
        with torch.no_grad():
            out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
            steps = [out.logits]
            for t in range(prefill, length):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache_of(out))
                steps.append(out.logits)
    real = mask.bool()
    assert_logits_close(torch.cat(steps, dim=1)[real], full[real])


@pytest.mark.parametrize("scheme", SCHEMES)
@fast(6)
@given(data=st.data(), source_side=st.sampled_from(("left", "right")))
def test_seq2seq_cached_decoding_equals_full_forward(scheme: str, data: st.DataObject, source_side: str) -> None:
    """Encoder-decoder, every scheme: with a padded source batch, a decoder prefill then token-by-token decoding with
    the cache (self- and cross-attention) gives the logits of one full decoder forward."""
    model = build(RelformerForConditionalGeneration, data.draw(architectures(scheme, "seq2seq")), data.draw(seeds()))
    _, source, source_mask = data.draw(padded_batches(source_side))
    target = token_ids(data.draw, source.shape[0], data.draw(st.integers(1, MAX_LENGTH), label="target length"))
    prefill = data.draw(st.integers(1, target.shape[1]), label="prefill")
    encoder = {"input_ids": source, "attention_mask": source_mask}
    full = lm_logits(model, target, None, **encoder)
    with torch.no_grad():
        out = model(**encoder, decoder_input_ids=target[:, :prefill], use_cache=True)
        steps = [out.logits]
        encoder_outputs = (out.encoder_last_hidden_state,)
        for t in range(prefill, target.shape[1]):
            step = {"encoder_outputs": encoder_outputs, "attention_mask": source_mask}
            out = model(**step, decoder_input_ids=target[:, t : t + 1], cache=cache_of(out))
            steps.append(out.logits)
    assert_logits_close(torch.cat(steps, dim=1), full)


# ---------------------------------------------------------------------------------------------------------------
# 3. Padding changes no real token
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scheme", SCHEMES)
@fast(6)
@given(data=st.data(), blocking=blocks(), seed=seeds())
def test_padded_batch_equals_each_row_alone(
    scheme: str, form: str, data: st.DataObject, blocking: tuple[int | None, bool], seed: int
) -> None:
    """Every scheme and form: each row's logits at its real positions are the same alone as inside a padded batch
    (decoder-only: left padding; encoder and the source of an encoder-decoder: left or right padding)."""
    model = build(LM_CLASSES[form], data.draw(architectures(scheme, form)), seed)
    side = "left" if form == "decoder" else data.draw(st.sampled_from(("left", "right")), label="side")
    rows, ids, mask = data.draw(padded_batches(side))
    with attention_blocks(*blocking):
        if form == "seq2seq":  # pad the source; every row has the same decoder input
            target = token_ids(data.draw, 1, data.draw(st.integers(1, 6), label="target length"))
            batch = lm_logits(model, target.expand(len(rows), -1), None, input_ids=ids, attention_mask=mask)
            alone = [lm_logits(model, target, None, input_ids=row[None])[0] for row in rows]
            real = torch.ones(batch.shape[:2], dtype=torch.bool)
        else:
            batch = lm_logits(model, ids, mask)
            alone = [lm_logits(model, row[None], None)[0] for row in rows]
            real = mask.bool()
    for i, row_logits in enumerate(alone):
        assert_logits_close(batch[i][real[i]], row_logits, msg=f"row {i}: ")


# ---------------------------------------------------------------------------------------------------------------
# 4. Relative schemes do not see absolute positions; absolute schemes do
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def shifted_positions(draw: st.DrawFn, max_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded ids `[B, L]` (L >= 2: a lone causal token attends to itself whatever its scores) and position ids
    `[B, L]` shifted by a random offset in 1..max_offset per row."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(2, MAX_LENGTH))
    offsets = torch.tensor(draw(st.lists(st.integers(1, max_offset), min_size=batch, max_size=batch)))
    return token_ids(draw, batch, length), torch.arange(length)[None] + offsets[:, None]


@pytest.mark.parametrize("form", ["decoder", "encoder"])
@pytest.mark.parametrize("scheme", OFFSET_FREE_SCHEMES)
@fast(8)
@given(data=st.data(), seed=seeds())
def test_relative_schemes_ignore_absolute_offsets(scheme: str, form: str, data: st.DataObject, seed: int) -> None:
    """Relative (all variants), none and rotary: position ids shifted by a random offset per row give the same logits
    (exactly for relative and none, which see distances only; to float tolerance for rotary, where q_m·k_n depends on
    m - n only mathematically)."""
    model = build(LM_CLASSES[form], data.draw(architectures(scheme, form)), seed)
    # rotary: fp32 angles p·θ lose precision as p grows, so offsets stay within a realistic range
    rotates = issubclass(scheme_of(scheme).stack_part, RotaryPositions)  # rotary, xpos
    ids, shifted = data.draw(shifted_positions(max_offset=64 if rotates else 10_000))
    logits, shifted_logits = lm_logits(model, ids, None), lm_logits(model, ids, None, position_ids=shifted)
    if rotates:
        assert_logits_close(shifted_logits, logits)
    else:
        assert torch.equal(shifted_logits, logits)


@pytest.mark.parametrize("form", ["decoder", "encoder"])
@pytest.mark.parametrize("scheme", ABSOLUTE_SCHEMES)
@fast(8)
@given(data=st.data(), seed=seeds())
def test_absolute_schemes_see_absolute_offsets(scheme: str, form: str, data: st.DataObject, seed: int) -> None:
    """Learned and sinusoidal positions: shifting the position ids changes every row's logits, so the offset
    invariance of the relative schemes is a real property."""
    model = build(LM_CLASSES[form], data.draw(architectures(scheme, form)), seed)
    ids, shifted = data.draw(shifted_positions(max_offset=64 - MAX_LENGTH))  # inside the learned table
    change = (lm_logits(model, ids, None, position_ids=shifted) - lm_logits(model, ids, None)).abs()
    assert (change.flatten(1).amax(-1) > 1e-3).all(), change.flatten(1).amax(-1)


# ---------------------------------------------------------------------------------------------------------------
# 5. Save / load round trips are exact
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("form", FORMS)
@fast(3)
@given(data=st.data(), seed=seeds())
def test_save_load_round_trip_is_exact(form: str, scheme: str, data: st.DataObject, seed: int) -> None:
    """Any valid config of any form and head: save_pretrained then the Auto class's from_pretrained gives the same
    class, the same config (to_diff_dict), a bitwise identical state dict and bitwise identical outputs."""
    overrides = data.draw(architectures(scheme, form))
    model_class, auto_class = data.draw(st.sampled_from(AUTO_CLASSES[form]), label="class")
    model = build(model_class, overrides, seed)
    _, ids, mask = data.draw(padded_batches("right" if form != "decoder" else "left", max_length=8))
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model.config.type_vocab_size:  # segments (for an encoder-decoder: of the source)
        types = st.lists(st.integers(0, 1), min_size=ids.numel(), max_size=ids.numel())
        inputs["token_type_ids"] = torch.tensor(data.draw(types, label="token types")).view(ids.shape)
    if form == "seq2seq":
        inputs["decoder_input_ids"] = token_ids(data.draw, ids.shape[0], data.draw(st.integers(1, 6)))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = auto_class.from_pretrained(folder, attn_implementation=model.config._attn_implementation).eval()
    assert type(loaded) is type(model)  # RelformerModel: the class of its form
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert loaded_state[name].dtype == tensor.dtype and torch.equal(loaded_state[name], tensor), name
    buffers = dict(loaded.named_buffers())  # non-persistent ones (sinusoidal, rotary) are refilled on loading
    for name, tensor in model.named_buffers():
        assert torch.equal(buffers[name], tensor), name
    with torch.no_grad():
        # transformers loads safetensors into memory that is not 64-byte aligned, and CPU kernels round differently on
        # unaligned memory (~5e-7; a GPT-2 does the same): move the (bitwise equal) tensors so outputs compare exactly
        for parameter in loaded.parameters():
            parameter.data = parameter.data.clone()
        expected, actual = model(**inputs), loaded(**inputs)
    assert torch.equal(actual[0], expected[0])  # logits, or last_hidden_state for the bare model
