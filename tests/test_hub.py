"""Hub sharing: model cards rendered for every form, the checks a folder must pass before upload, the dry run, the
calls made at the HfApi boundary (one commit, retries for server errors only)."""

import json
import os

import httpx2
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2TokenizerFast, pipeline

from hf_relformer import RelformerForConditionalGeneration, RelformerForMaskedLM
from hf_relformer.hub import card as card_module
from hf_relformer.hub import upload as upload_module
from hf_relformer.hub.card import render_card
from hf_relformer.hub.upload import UploadError, upload, validate_folder

from helpers import redraw_weights, run_script, tiny_config, tiny_lm, tiny_seq2seq


def metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory, gpt2_tokenizer_path):
    """A causal LM folder as a user would share it: weights, modeling code, tokenizer, card."""
    folder = tmp_path_factory.mktemp("share") / "tiny-relformer"
    tiny_lm("relative_values", vocab_size=50257).save_pretrained(folder)
    GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_path).save_pretrained(folder)
    card_module.write_card(folder, results={"perplexity": 12.5})
    return folder


def copy_of(folder, tmp_path, name="copy"):
    target = tmp_path / name
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


# ---------------------------------------------------------------------------------------------------------------
# Cards
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "pipeline_tag", "form", "auto_class"),
    [
        (lambda: tiny_lm("relative"), "text-generation", "decoder-only", "AutoModelForCausalLM"),
        (
            lambda: redraw_weights(RelformerForMaskedLM(tiny_config(is_decoder=False))),
            "fill-mask",
            "encoder",
            "AutoModelForMaskedLM",
        ),
        (lambda: tiny_seq2seq("sinusoidal"), "text2text-generation", "encoder-decoder", "AutoModelForSeq2SeqLM"),
    ],
    ids=["causal", "masked-lm", "seq2seq"],
)
def test_card_for_each_form(build, pipeline_tag, form, auto_class, tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    (tmp_path / "conversion.json").write_text(json.dumps({"source": "gpt2", "source_name": "openai-community/gpt2"}))
    results = {
        "accuracy": 0.75,
        "model_index": [
            {
                "task_type": "text-generation",
                "dataset_type": "shakespeare",
                "dataset_name": "Shakespeare (Macbeth)",
                "metric_type": "perplexity",
                "metric_value": 197.2,
            }
        ],
    }
    card = render_card(tmp_path, results=results, datasets=["shakespeare"], repo_id="me/tiny")
    data = metadata(str(card))
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == pipeline_tag
    assert "relformer" in data["tags"] and data["license"] == "apache-2.0"
    assert data["base_model"] == "openai-community/gpt2" and data["datasets"] == ["shakespeare"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 197.2
    text = str(card)
    assert f"| {form} |" in text and auto_class in text and 'from_pretrained("me/tiny"' in text
    assert "trust_remote_code=True" in text and "| accuracy | 0.75 |" in text
    parameters = sum(t.numel() for t in load_file(tmp_path / "model.safetensors").values())
    assert f"{parameters:,}" in text


def test_card_cli_writes_readme_and_reports_bad_input(tmp_path, capsys):
    tiny_lm("relative").save_pretrained(tmp_path / "model")
    (tmp_path / "results.json").write_text(json.dumps({"bleu": 38.2}))
    assert card_module.main([str(tmp_path / "model"), "--results", str(tmp_path / "results.json")]) == 0
    assert "| bleu | 38.2 |" in (tmp_path / "model" / "README.md").read_text()
    (tmp_path / "bad.json").write_text("{not json")
    assert card_module.main([str(tmp_path / "model"), "--results", str(tmp_path / "bad.json")]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        card_module.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# Validation before upload
# ---------------------------------------------------------------------------------------------------------------


def test_a_complete_folder_passes_including_the_fresh_process_load(shared_folder):
    result = validate_folder(shared_folder)
    assert result.ok, result.problems
    assert result.warnings == []


def test_seq2seq_folder_passes_validation(tmp_path):
    model = tiny_seq2seq("relative")
    assert isinstance(model, RelformerForConditionalGeneration)
    model.save_pretrained(tmp_path)
    result = validate_folder(tmp_path, write_card_if_missing=True)
    assert result.ok, result.problems
    assert any("tokenizer" in w for w in result.warnings) and any("generated" in w for w in result.warnings)


def test_every_problem_is_listed(shared_folder, tmp_path):
    folder = copy_of(shared_folder, tmp_path)
    (folder / "modeling_relformer.py").unlink()
    (folder / "README.md").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 48}))
    result = validate_folder(folder)
    text = "\n".join(result.problems)
    assert "modeling_relformer.py" in text
    assert "pytorch_model.bin" in text
    assert "model.layers.0.mlp.up_proj.weight has shape (64, 32), the config needs (48, 32)" in text
    assert "README.md (model card) missing" in text


def test_damaged_weights_and_config_are_problems(shared_folder, tmp_path):
    folder = copy_of(shared_folder, tmp_path, "damaged")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert any("cannot be read" in p for p in validate_folder(folder).problems)
    folder = copy_of(shared_folder, tmp_path, "extra")
    tensors = load_file(folder / "model.safetensors") | {"stray.weight": torch.zeros(2)}
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    assert any("stray.weight" in p for p in validate_folder(folder).problems)
    folder = copy_of(shared_folder, tmp_path, "config")
    (folder / "config.json").write_text(json.dumps({"model_type": "relformer", "hidden_size": -3}))
    assert any("does not load as a RelformerConfig" in p for p in validate_folder(folder).problems)
    folder = copy_of(shared_folder, tmp_path, "card")
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n# card\n")
    assert any("metadata" in p for p in validate_folder(folder).problems)


# ---------------------------------------------------------------------------------------------------------------
# Upload: dry run and the HfApi boundary
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_fresh_process(monkeypatch):
    """The fresh-process load is tested above; the HfApi-boundary tests skip it to stay fast."""
    monkeypatch.setattr(upload_module, "_check_remote_load", lambda folder, config, result: None)


class FakeApi:
    """Records the calls the uploader makes; `failures` maps a method to errors raised before it succeeds."""

    def __init__(self, failures=None):
        self.calls = []
        self.failures = {name: list(errors) for name, errors in (failures or {}).items()}

    def _call(self, name, args, kwargs):
        self.calls.append((name, args, kwargs))
        if self.failures.get(name):
            raise self.failures[name].pop(0)

    def create_repo(self, *args, **kwargs):
        self._call("create_repo", args, kwargs)

    def create_branch(self, *args, **kwargs):
        self._call("create_branch", args, kwargs)

    def upload_folder(self, *args, **kwargs):
        self._call("upload_folder", args, kwargs)
        return type("Commit", (), {"commit_url": "http://hub/me/tiny/commit/abc"})()


def http_error(status: int) -> HfHubHTTPError:
    response = httpx2.Response(status, request=httpx2.Request("POST", "http://hub/api"))
    return HfHubHTTPError(f"{status} error", response=response)


def test_dry_run_sends_nothing_and_lists_the_files(no_fresh_process, shared_folder, capsys):
    api = FakeApi()
    assert upload(shared_folder, "me/tiny", dry_run=True, api=api) is None
    out = capsys.readouterr().out
    assert api.calls == []
    assert "would upload" in out and "model.safetensors" in out and "me/tiny" in out


def test_upload_is_one_commit_after_creating_the_repo(no_fresh_process, shared_folder):
    api = FakeApi()
    url = upload(
        shared_folder, "me/tiny", private=True, revision="v1", create_branch=True, commit_message="first", api=api
    )
    assert url.endswith("/commit/abc")
    assert [name for name, _, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2] == {"private": True, "exist_ok": True} and api.calls[0][1] == ("me/tiny",)
    assert api.calls[1][2] == {"branch": "v1", "exist_ok": True}
    upload_kwargs = api.calls[2][2]
    assert upload_kwargs["folder_path"] == str(shared_folder) and upload_kwargs["revision"] == "v1"
    assert upload_kwargs["commit_message"] == "first" and upload_kwargs["repo_id"] == "me/tiny"


def test_server_errors_are_retried_with_backoff_client_errors_are_not(no_fresh_process, shared_folder):
    api, waits = FakeApi({"upload_folder": [http_error(503), ConnectionResetError("reset")]}), []
    upload(shared_folder, "me/tiny", api=api, sleep=waits.append, log=lambda message: None)
    assert [name for name, _, _ in api.calls].count("upload_folder") == 3 and waits == [2.0, 4.0]
    for status, hint in ((401, "token"), (403, "may not write"), (404, "not found"), (409, "conflict")):
        api, waits = FakeApi({"create_repo": [http_error(status)]}), []
        with pytest.raises(UploadError, match=hint):
            upload(shared_folder, "me/tiny", api=api, sleep=waits.append)
        assert len(api.calls) == 1 and waits == []
    api = FakeApi({"upload_folder": [http_error(500)] * (upload_module.RETRIES + 1)})
    with pytest.raises(UploadError, match="gave up"):
        upload(shared_folder, "me/tiny", api=api, sleep=lambda seconds: None, log=lambda message: None)


def test_invalid_folder_is_refused_before_any_call(shared_folder, tmp_path, capsys):
    folder = copy_of(shared_folder, tmp_path, "broken")
    (folder / "positions_relformer.py").unlink()
    api = FakeApi()
    with pytest.raises(UploadError, match=r"positions_relformer\.py"):
        upload(folder, "me/tiny", api=api)
    assert api.calls == []
    assert upload_module.main([str(folder), "me/tiny", "--dry-run"]) == 1
    assert "not ready to share" in capsys.readouterr().err
    for argv in (
        [str(folder), "no-slash"],
        [str(tmp_path / "none"), "me/tiny"],
        [str(folder), "me/x", "--create-branch"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            upload_module.main(argv)
        assert exit_info.value.code == 2


def test_generated_card_loads_as_a_model_card(shared_folder):
    card = ModelCard.load(shared_folder / "README.md")
    assert card.data.library_name == "transformers" and "| perplexity | 12.5 |" in card.text


# ---------------------------------------------------------------------------------------------------------------
# The read path end to end: a real Hub-compatible server (olah, offline mirror) on loopback
# ---------------------------------------------------------------------------------------------------------------

HUB_READ_SCRIPT = """
import json, sys
sys.modules["hf_relformer"] = None  # a user without the package
import torch
from transformers import AutoModelForCausalLM, pipeline
repo_id, revision, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
generator = pipeline("text-generation", model=repo_id, revision=revision, trust_remote_code=True)
text = generator("The history of", max_new_tokens=12, do_sample=False)[0]["generated_text"]
print(json.dumps({"logits": logits.tolist(), "text": text}))
"""


def test_models_and_pipelines_load_by_repo_id_from_a_hub_server(hub_server, shared_folder, tmp_path):
    endpoint, publish = hub_server
    assert validate_folder(shared_folder).ok  # only a validated folder is published
    sha = publish(shared_folder, "relformer-org/tiny-relformer")
    ids = [[464, 2068, 7586, 21831, 18045, 625]]
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    remote = run_script(HUB_READ_SCRIPT, ["relformer-org/tiny-relformer", sha, json.dumps(ids)], env, tmp_path)
    local = AutoModelForCausalLM.from_pretrained(shared_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(remote["logits"]), local(torch.tensor(ids)).logits, atol=1e-6, rtol=0)
    generator = pipeline("text-generation", model=str(shared_folder))
    assert remote["text"] == generator("The history of", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert (tmp_path / "cache").is_dir()  # the files really came through the server


def test_a_trainer_output_folder_is_sent_without_its_training_artifacts(no_fresh_process, shared_folder, tmp_path):
    """What `Trainer.save_model()` and checkpointing leave beside the model (training_args.bin is a pickle) is skipped
    with one line, not refused; any other pickle still is, unless excluded with --exclude."""
    from transformers import Trainer, TrainingArguments

    folder = copy_of(shared_folder, tmp_path, "trained")
    model = AutoModelForCausalLM.from_pretrained(folder)
    args = TrainingArguments(output_dir=str(folder), max_steps=1, save_steps=1, report_to=[], use_cpu=True,
                             per_device_train_batch_size=2)  # fmt: skip
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 2
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model()
    assert (folder / "training_args.bin").is_file() and any(folder.glob("checkpoint-*"))
    (folder / "runs").mkdir(exist_ok=True)  # TensorBoard's logs, when it reports there
    (folder / "runs" / "events.log").write_text("x")

    lines, api = [], FakeApi()
    upload(folder, "me/tiny", api=api, log=lines.append)
    sent = api.calls[-1][2]["allow_patterns"]
    assert "model.safetensors" in sent and "config.json" in sent and "modeling_relformer.py" in sent
    assert not [name for name in sent if name.startswith(("checkpoint-", "runs/")) or name.endswith(".bin")], sent
    skipped = [line for line in lines if line.startswith("skipped")]
    assert len(skipped) == 1 and "training_args.bin" in skipped[0] and "checkpoint-1/" in skipped[0]
    assert "runs/" in skipped[0]

    (folder / "extra.pkl").write_bytes(b"not a model")
    with pytest.raises(UploadError, match=r"extra\.pkl"):
        upload(folder, "me/tiny", api=FakeApi(), log=lines.append)
    api = FakeApi()
    upload(folder, "me/tiny", api=api, exclude=("*.pkl",), log=lines.append)
    assert "extra.pkl" not in api.calls[-1][2]["allow_patterns"]
    assert upload_module.main([str(folder), "me/tiny", "--dry-run", "--exclude", "extra.pkl"]) == 0


def test_the_cards_snippet_runs_without_the_package_and_never_asks_about_remote_code(shared_folder, tmp_path):
    """The card's "How to use" code, run as written (repo id -> the folder) in a fresh process where hf_relformer
    cannot be imported: the tokenizer is transformers' own class, loaded without remote code and without the
    trust_remote_code question (which AutoConfig, called by AutoTokenizer, would otherwise ask)."""
    import subprocess
    import sys

    snippet = str(render_card(shared_folder, repo_id="me/tiny")).split("```python", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('"me/tiny"', repr(str(shared_folder))).replace("max_new_tokens=30", "max_new_tokens=3")
    script = (
        'import sys\nsys.modules["hf_relformer"] = None\n' + snippet
        + '\nassert type(tokenizer).__module__.startswith("transformers."), type(tokenizer).__module__\nprint("ran")\n'
    )  # fmt: skip
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], input="y\n", capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ran")
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
