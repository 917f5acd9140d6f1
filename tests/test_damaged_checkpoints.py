"""Loading a damaged or incomplete checkpoint folder fails with an error that names the checkpoint and the problem;
pickled code in a weight file is never run."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_relformer import RelformerForCausalLM

from helpers import run_script, tiny_lm


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    tiny_lm().save_pretrained(folder)
    return folder


def damaged(good: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(good, folder)
    damage(folder)
    return folder


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[12:30] = b"#" * 18
    path.write_bytes(bytes(data))


def empty(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


@pytest.mark.parametrize("damage", [truncate, scramble_header, empty])
def test_a_damaged_weight_file_is_named(good, tmp_path, damage):
    folder = damaged(good, tmp_path, damage)
    for auto in (AutoModelForCausalLM, AutoModel):
        with pytest.raises(OSError, match=r"The weights of the checkpoint '.*damaged' cannot be read: .* damaged"):
            auto.from_pretrained(folder)


def test_the_shipped_code_names_a_damaged_file_too(good, tmp_path):
    """Where the package is not installed (trust_remote_code=True), the checkpoint's own code gives the same error."""
    folder = damaged(good, tmp_path, truncate)
    script = """
import json, sys
sys.modules["hf_relformer"] = None
import transformers
try:
    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    print(json.dumps({"error": None}))
except Exception as error:
    print(json.dumps({"type": type(error).__name__, "error": str(error), "module": type(error).__module__}))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = run_script(script, [str(folder)], env, tmp_path)
    assert result["type"] == "OSError"
    assert "cannot be read" in result["error"] and "damaged" in result["error"]


@pytest.mark.parametrize(("field", "value"), [("hidden_size", 64), ("vocab_size", 100), ("num_attention_heads", 8)])
def test_a_config_that_does_not_fit_the_weights_is_named(good, tmp_path, field, value):
    def edit_config(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))

    folder = damaged(good, tmp_path, edit_config)  # 8 heads: config.json keeps head_dim 8, so q is [64, 32]
    tensor = {"hidden_size": "model.embed_tokens.weight", "vocab_size": "model.embed_tokens.weight"}.get(
        field, "model.layers.0.self_attn.o_proj.weight"
    )
    with pytest.raises(ValueError, match=rf"do not fit its config\.json.*another shape \({tensor} is \("):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="another shape"):
        AutoModel.from_pretrained(folder)
    _, info = AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True, output_loading_info=True)
    assert tensor in {entry[0] for entry in info["mismatched_keys"]}


def test_tensors_the_config_has_no_place_for_are_named(good, tmp_path):
    """A config.json with fewer layers than the weights: transformers would drop the extra layer silently."""

    def fewer_layers(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": 1}))

    folder = damaged(good, tmp_path, fewer_layers)
    for auto in (AutoModelForCausalLM, AutoModel):
        with pytest.raises(ValueError, match=r"17 tensor\(s\) the model has no place for \(model\.layers\.1\."):
            auto.from_pretrained(folder)
    assert len(AutoModelForCausalLM.from_pretrained(folder, allow_unused_weights=True).model.layers) == 1


def test_missing_tensors_are_named_unless_allowed(good, tmp_path):
    def drop_a_tensor(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    folder = damaged(good, tmp_path, drop_a_tensor)
    for auto, name in ((AutoModelForCausalLM, "model.layers.1"), (AutoModel, "layers.1")):
        with pytest.raises(ValueError, match=rf"1 tensor\(s\) missing \({name}.mlp.up_proj.weight; allow_missing"):
            auto.from_pretrained(folder)
    model, info = AutoModelForCausalLM.from_pretrained(folder, allow_missing_weights=True, output_loading_info=True)
    assert info["missing_keys"] == {"model.layers.1.mlp.up_proj.weight"}
    assert isinstance(model, RelformerForCausalLM)


def test_a_new_head_on_a_complete_body_loads(good):
    """A classifier on a causal LM checkpoint: only the head's own layers are new, which is expected."""
    model, info = AutoModelForSequenceClassification.from_pretrained(good, num_labels=3, output_loading_info=True)
    assert info["missing_keys"] == {"score.weight"} or all(not k.startswith("model.") for k in info["missing_keys"])
    assert model.classifier.weight.shape == (3, 32)
    loaded = AutoModelForCausalLM.from_pretrained(good)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, loaded.model.layers[0].mlp.up_proj.weight)


def test_half_there_folders_say_what_is_missing(good, tmp_path):
    folder = damaged(good, tmp_path, lambda folder: (folder / "model.safetensors").unlink())
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)
    shutil.rmtree(folder)
    folder = damaged(good, tmp_path, lambda folder: (folder / "config.json").unlink())
    with pytest.raises((OSError, ValueError), match=r"config\.json"):
        AutoModelForCausalLM.from_pretrained(folder)  # transformers: "Should have a `model_type` key in its config"
    with pytest.raises(OSError, match=r"has no config\.json: the folder is incomplete"):
        RelformerForCausalLM.from_pretrained(folder)
    shutil.rmtree(folder)
    folder = damaged(good, tmp_path, lambda folder: (folder / "config.json").write_text("{"))
    with pytest.raises(OSError, match="not a valid JSON file"):
        AutoModelForCausalLM.from_pretrained(folder)


class RunsCode:
    """Pickled, this becomes a call to `Path.touch(marker)` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_a_weight_file_is_refused_and_never_runs(good, tmp_path):
    marker = tmp_path / "code-ran"
    folder = damaged(good, tmp_path, lambda folder: (folder / "model.safetensors").unlink())
    state = dict(RelformerForCausalLM.from_pretrained(good).state_dict())
    torch.save({**state, "extra": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"pickle-based weight file .* refused.*Unsupported|pickle-based .* GLOBAL"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert not marker.exists()
    torch.save(state, folder / "pytorch_model.bin")  # tensors only: weights_only loading accepts it
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"])
