"""The `relformer-text2text` pipeline: by path with the package installed, batched, and shipped with the
checkpoint for a fresh process where hf_relformer cannot be imported."""

import json
import os
import subprocess
import sys

import pytest
from transformers import GPT2TokenizerFast, pipeline

from hf_relformer import RelformerText2TextPipeline
from hf_relformer.saving import save_pretrained_atomically

from helpers import tiny_seq2seq

TEXTS = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light"]
GENERATE = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module")
def seq2seq_folder(gpt2_tokenizer_path, tmp_path_factory):
    tokenizer = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_path)
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    model = tiny_seq2seq(
        "relative", vocab_size=len(tokenizer), pad_token_id=eos, bos_token_id=eos, eos_token_id=eos,
        decoder_start_token_id=eos,
    )  # fmt: skip
    path = save_pretrained_atomically(tmp_path_factory.mktemp("seq2seq") / "relformer", model, tokenizer)
    expected = []
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")
        expected.append(tokenizer.decode(model.generate(**ids, **GENERATE)[0], skip_special_tokens=True))
    return path, expected


def test_pipeline_by_task_name_and_path(seq2seq_folder):
    path, expected = seq2seq_folder
    translator = pipeline("relformer-text2text", model=str(path))
    assert isinstance(translator, RelformerText2TextPipeline)
    assert [translator(text, **GENERATE)[0]["generated_text"] for text in TEXTS] == expected
    batched = translator(TEXTS, batch_size=2, **GENERATE)  # one dict per input, as transformers 4's text2text gave
    assert [out["generated_text"] for out in batched] == expected
    assert len(translator(TEXTS[0], num_beams=3, num_return_sequences=2, **GENERATE)) == 2
    several = translator(TEXTS, num_beams=3, num_return_sequences=2, **GENERATE)  # a list per input
    assert [len(out) for out in several] == [2, 2] and all("generated_text" in d for out in several for d in out)


def test_pipeline_rejects_non_text(seq2seq_folder):
    translator = pipeline("relformer-text2text", model=str(seq2seq_folder[0]))
    with pytest.raises(TypeError, match="relformer-text2text takes a string"):
        translator(42)


REMOTE_SCRIPT = """
import json, sys
sys.modules["hf_relformer"] = None  # as on a machine where the package is not installed
from transformers import pipeline
translator = pipeline("relformer-text2text", model=sys.argv[1], trust_remote_code=True)
texts, generate = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps([translator(text, **generate)[0]["generated_text"] for text in texts]))
"""


def test_pipeline_shipped_with_the_checkpoint_runs_without_the_package(seq2seq_folder, tmp_path):
    path, expected = seq2seq_folder
    pipeline("relformer-text2text", model=str(path)).save_pretrained(tmp_path / "shipped")
    assert (tmp_path / "shipped" / "pipeline_relformer.py").is_file()
    config = json.loads((tmp_path / "shipped" / "config.json").read_text())
    assert config["custom_pipelines"]["relformer-text2text"]["impl"] == "pipeline_relformer.RelformerText2TextPipeline"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "shipped"), json.dumps(TEXTS), json.dumps(GENERATE)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
