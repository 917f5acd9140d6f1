"""relformer-upgrade: checkpoints carry the code they were saved with, frozen; the command replaces it.

The fixture `tests/fixtures/relformer-9fd2905` is a tiny causal LM saved by the package at commit 9fd2905, before the
transformers 5.24 cache rename (how it was written: its README.md). Loaded without the package on transformers 5.24,
its shipped code fails every padded `generate()` and decodes wrongly from its cache (the first test shows it; on 5.23
it works). Upgraded, it loads without the package and generates correctly on both supported versions.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi
from safetensors.torch import load_file

import hf_relformer
from hf_relformer import RelformerForCausalLM
from hf_relformer.checkpoint import MODEL_CODE, CheckpointError
from hf_relformer.configuration_relformer import CODE_VERSION_KEY, TESTED_TRANSFORMERS
from hf_relformer.hub import upgrade as upgrade_module
from hf_relformer.hub.upgrade import UpgradeError, upgrade_repo, verify

from helpers import REPO_ROOT, run_remote_code

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "relformer-9fd2905"
PACKAGE = Path(hf_relformer.__file__).parent
ON_524 = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (5, 24)


def fixture_copy(tmp_path: Path, name: str = "model") -> Path:
    """The fixture with a stand-in tokenizer file beside it (the upgrade must not touch it)."""
    folder = tmp_path / name
    shutil.copytree(FIXTURE, folder)
    (folder / "tokenizer.json").write_text('{"stand-in": "tokenizer"}\n')
    return folder


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def run_upgrade(argv, capsys) -> tuple[int, str, str]:
    code = upgrade_module.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_old_checkpoint_is_broken_without_the_package_on_transformers_524(tmp_path):
    folder = fixture_copy(tmp_path)
    if ON_524:
        with pytest.raises(UpgradeError, match=r"attention_mask must have shape \[batch, length\] = \[2, 1\]"):
            verify(folder)
    else:  # transformers 5.23: the old code still works
        assert "cached generation equals uncached" in verify(folder)


def test_upgrade_replaces_the_code_and_nothing_else_then_loads_and_generates_without_the_package(tmp_path, capsys):
    folder = fixture_copy(tmp_path)
    before = digests(folder)
    old_config = json.loads((folder / "config.json").read_text())
    code, out, err = run_upgrade([folder], capsys)
    assert code == 0, err
    assert "modeling_relformer.py: replaced" in out and "configuration_relformer.py: replaced" in out
    assert f"{CODE_VERSION_KEY} (none" in out and "cached generation equals uncached" in out
    for name in MODEL_CODE:
        assert (folder / name).read_bytes() == (PACKAGE / name).read_bytes(), name
    after = digests(folder)
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "README.md"):
        assert after[name] == before[name], f"{name} changed"
    assert set(after) == set(before) | set(MODEL_CODE)  # files the code gained since are added
    new_config = json.loads((folder / "config.json").read_text())
    assert new_config == {**old_config, CODE_VERSION_KEY: hf_relformer.__version__}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary sibling left

    # Without the package, in a fresh process: the package's logits and greedy tokens (and verify(): cache, padding).
    ids = torch.tensor([[1, 5, 9, 13, 7, 3]])
    remote = run_remote_code(folder, "AutoModelForCausalLM", {"input_ids": ids}, tmp_path)
    local = RelformerForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(remote["logits"]), local(ids).logits, atol=1e-5, rtol=0)
    expected = local.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert remote["generated"] == expected.tolist()
    assert "cached generation equals uncached" in verify(folder)

    code, out, _ = run_upgrade([folder], capsys)  # a second run is a no-op that says so
    assert code == 0 and "already up to date" in out and digests(folder) == after


def refuse_no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def refuse_foreign_config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))


def refuse_damaged_config(folder: Path) -> None:
    data = (folder / "config.json").read_bytes()
    (folder / "config.json").write_bytes(data[: len(data) // 2])


def refuse_damaged_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (refuse_no_config, "has no config.json"),
        (refuse_foreign_config, "model_type is 'gpt2'"),
        (refuse_damaged_config, "not valid JSON"),
        (refuse_damaged_weights, "model.safetensors cannot be read"),
    ],
    ids=["no-config", "foreign-config", "damaged-config", "damaged-weights"],
)
def test_a_damaged_or_foreign_folder_is_refused_and_left_byte_identical(damage, reason, tmp_path, capsys):
    folder = fixture_copy(tmp_path)
    damage(folder)
    before = digests(folder)
    code, out, err = run_upgrade([folder], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("relformer-upgrade: error: "), err
    assert reason in err and "nothing was changed" in err
    assert digests(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_verification_leaves_the_folder_byte_identical(tmp_path, capsys, monkeypatch):
    folder = fixture_copy(tmp_path)
    before = digests(folder)

    def failing(staging):
        assert (staging / "modeling_relformer.py").read_bytes() == (PACKAGE / "modeling_relformer.py").read_bytes()
        raise UpgradeError("loaded without hf_relformer, the outputs differ (simulated)")

    monkeypatch.setattr(upgrade_module, "verify", failing)
    code, _, err = run_upgrade([folder], capsys)
    assert code == 1 and "relformer-upgrade: error: loaded without hf_relformer" in err
    assert digests(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_usage_errors_exit_2(tmp_path, capsys):
    for argv in ([tmp_path / "none"], [], [tmp_path, "--repo-id", "me/x"], [tmp_path, "--dry-run"], ["--repo-id", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            upgrade_module.main([str(arg) for arg in argv])
        assert exit_info.value.code == 2, argv
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------------
# The version record, and the one-line suggestion of old shipped code on a newer transformers
# ---------------------------------------------------------------------------------------------------------------


LOAD_SCRIPT = """
import sys
sys.modules["hf_relformer"] = None
import transformers
transformers.AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
"""


def suggestion_lines(folder: Path, tmp_path: Path) -> list[str]:
    """The stderr lines suggesting relformer-upgrade when `folder` is loaded without the package."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if "relformer-upgrade" in line]


def test_shipped_code_older_than_the_installed_transformers_suggests_the_upgrade_once(tmp_path, caplog):
    folder = fixture_copy(tmp_path)
    upgrade_module.upgrade_folder(folder, log=lambda line: None)
    assert suggestion_lines(folder, tmp_path) == []  # current code on a tested transformers: silent
    # The same code as if it had been tested only up to transformers 5.0 (older code on a newer transformers).
    shipped = folder / "configuration_relformer.py"
    text = shipped.read_text()
    tested = f'TESTED_TRANSFORMERS = "{TESTED_TRANSFORMERS}"'
    assert tested in text
    shipped.write_text(text.replace(tested, 'TESTED_TRANSFORMERS = "5.0"'))
    lines = suggestion_lines(folder, tmp_path)
    assert len(lines) == 1 and "tested with transformers up to 5.0" in lines[0], lines
    # With the package installed its own classes are used: silent, even where its constant says otherwise.
    with caplog.at_level("WARNING"):
        transformers.AutoConfig.from_pretrained(folder)
        hf_relformer.configuration_relformer.TESTED_TRANSFORMERS = "5.0"
        try:
            RelformerForCausalLM.from_pretrained(folder)
        finally:
            hf_relformer.configuration_relformer.TESTED_TRANSFORMERS = TESTED_TRANSFORMERS
    assert not any("relformer-upgrade" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------------------------------------------
# --repo-id against the local Hub server (olah serves reads; the commit is recorded at the HfApi boundary)
# ---------------------------------------------------------------------------------------------------------------


class RecordingApi(HfApi):
    """A real HfApi for reads; records the commits it would make (the offline mirror does not accept pushes)."""

    def __init__(self, endpoint: str):
        super().__init__(endpoint=endpoint)
        self.commits = []

    def create_commit(self, repo_id, operations, **kwargs):
        self.commits.append((repo_id, operations, kwargs))
        return type("Commit", (), {"commit_url": f"{self.endpoint}/{repo_id}/commit/new"})()


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))


def test_repo_upgrade_fetches_config_and_code_only_and_pushes_one_commit(hub_server, hub_env, tmp_path, capsys):
    endpoint, publish = hub_server
    sha = publish(fixture_copy(tmp_path, "published"), "relformer-org/old-relformer")
    api = RecordingApi(endpoint)
    assert upgrade_repo("relformer-org/old-relformer", api=api, dry_run=True) is None
    out = capsys.readouterr().out
    assert api.commits == [] and "Dry run: would commit" in out and "nothing was sent" in out
    assert "modeling_relformer.py: replaced" in out and "verified without hf_relformer (on sample weights)" in out

    url = upgrade_repo("relformer-org/old-relformer", api=api, commit_message="upgrade code")
    assert url.endswith("/commit/new") and len(api.commits) == 1
    repo_id, operations, kwargs = api.commits[0]
    assert repo_id == "relformer-org/old-relformer" and kwargs["parent_commit"] == sha
    assert kwargs["commit_message"] == "upgrade code"
    sent = {op.path_in_repo: op.path_or_fileobj for op in operations}
    changed = {
        name
        for name in MODEL_CODE
        if not (FIXTURE / name).is_file() or (FIXTURE / name).read_bytes() != (PACKAGE / name).read_bytes()
    }
    assert "modeling_relformer.py" in changed
    assert set(sent) == {"config.json", *changed}
    # The same files as the folder upgrade writes.
    folder = fixture_copy(tmp_path, "local")
    upgrade_module.upgrade_folder(folder, log=lambda line: None)
    for name, content in sent.items():
        assert content == (folder / name).read_bytes(), name
    assert load_file(FIXTURE / "model.safetensors").keys()  # the weights were never needed


def test_repo_upgrade_errors_are_one_line_and_a_current_repo_is_left_alone(hub_server, hub_env, tmp_path, capsys):
    endpoint, publish = hub_server
    code, _, err = run_upgrade(["--repo-id", "relformer-org/missing", "--endpoint", endpoint], capsys)
    assert code == 1 and err.startswith("relformer-upgrade: error: model_info refused by the Hub (401)"), err
    assert "no such repository" in err and len(err.strip().splitlines()) == 1, err
    folder = fixture_copy(tmp_path, "current")
    upgrade_module.upgrade_folder(folder, log=lambda line: None)
    publish(folder, "relformer-org/current")
    api = RecordingApi(endpoint)
    assert upgrade_repo("relformer-org/current", api=api) is None
    assert api.commits == [] and "already up to date" in capsys.readouterr().out
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    publish(tmp_path / "foreign", "relformer-org/foreign")
    with pytest.raises(CheckpointError, match="model_type is 'gpt2'"):
        upgrade_repo("relformer-org/foreign", api=api)
    assert api.commits == []


def test_tested_transformers_follows_the_dependency_range():
    """The shipped code's TESTED_TRANSFORMERS is the newest minor release pyproject.toml admits (`<5.(n+1)`), so that
    widening the range after CI passes on a new release also moves the upgrade hint."""
    import re

    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    major, minor = re.search(r'"transformers>=[\d.]+,<(\d+)\.(\d+)"', pyproject).groups()
    newest = f"{major}.{int(minor) - 1}"
    assert newest == TESTED_TRANSFORMERS
