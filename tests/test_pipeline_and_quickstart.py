"""The text-generation pipeline with the real GPT-2 tokenizer, the quickstart script, and atomic saving."""

import subprocess
import sys

import pytest
import torch
from transformers import GPT2TokenizerFast, pipeline

from hf_relformer import RelformerForCausalLM
from hf_relformer.saving import save_pretrained_atomically

from helpers import REPO_ROOT, redraw_weights, tiny_config

PROMPTS = ["Relative positions let attention", "A short prompt"]


@pytest.fixture(scope="module")
def saved_lm(gpt2_tokenizer_path, tmp_path_factory):
    tokenizer = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_path)
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; batching needs one
    eos = tokenizer.eos_token_id
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=eos, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = redraw_weights(RelformerForCausalLM(config))
    path = save_pretrained_atomically(tmp_path_factory.mktemp("lm") / "relformer", model, tokenizer)
    return path, model, tokenizer


def test_text_generation_pipeline_by_path(saved_lm):
    path, model, tokenizer = saved_lm
    generator = pipeline("text-generation", model=str(path))
    assert type(generator.model).__name__ == "RelformerForCausalLM"
    for prompt in PROMPTS:
        text = generator(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]["generated_text"]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert text == tokenizer.decode(expected[0])
    # a left-padded batch inside the pipeline gives each prompt the same text as alone
    batch = generator(PROMPTS, max_new_tokens=8, min_new_tokens=8, do_sample=False, batch_size=2)
    alone = [generator(p, max_new_tokens=8, min_new_tokens=8, do_sample=False) for p in PROMPTS]
    assert batch == alone


def test_atomic_save_keeps_the_previous_folder_when_a_save_fails(saved_lm, tmp_path):
    _, model, tokenizer = saved_lm
    target = save_pretrained_atomically(tmp_path / "out", model)
    before = sorted(p.name for p in target.iterdir())

    class Crashing:
        def save_pretrained(self, directory):
            (directory / "partial.bin").write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomically(target, tokenizer, Crashing())
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_quickstart_script_runs(gpt2_tokenizer_path, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "quickstart.py"),
            "--steps",
            "3",
            "--tokenizer",
            str(gpt2_tokenizer_path),
            "--output",
            str(tmp_path / "quickstart"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cached == uncached: True" in result.stdout
    assert "identical logits: True" in result.stdout
    assert (tmp_path / "quickstart" / "model.safetensors").is_file()
    assert (tmp_path / "quickstart" / "tokenizer.json").is_file()


def test_readme_use_snippet_builds_a_model_that_stops_at_eos(tmp_path, monkeypatch):
    """README's "Use" snippet runs as written and its model knows its special tokens, so generate() stops at eos (it
    had none: generation of a trained model never stopped before max_length)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    snippet = readme.split("## Use", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md (Use)", "exec"), namespace)
    model = namespace["model"]
    assert model.generation_config.eos_token_id == model.config.eos_token_id == 50256
    assert model.generation_config.pad_token_id == 50256
