"""Training and placement: Trainer's gradient accumulation, label smoothing, activation checkpointing and resume;
Accelerate device_map offload to CPU and disk; bf16 autocast. (Several processes: test_multiprocess.py.)"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_relformer import RelformerForCausalLM

from helpers import tiny_lm, tiny_seq2seq


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM examples of different lengths, right-padded to one length (labels -100 on padding): the number of
    labelled tokens differs from one micro-batch to the next, which is what gradient accumulation must count."""

    def __init__(self, count: int = 8, length: int = 12, vocab_size: int = 64, seed: int = 0, ragged: bool = True):
        generator = torch.Generator().manual_seed(seed)
        self.examples = []
        for i in range(count):
            size = length - (3 * i) % 7 if ragged else length
            ids = torch.full((length,), 0)
            ids[:size] = torch.randint(3, vocab_size, (size,), generator=generator)
            mask = (torch.arange(length) < size).long()
            self.examples.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def arguments(output: Path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output),
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    return TrainingArguments(**values | overrides)


def train(model, args: TrainingArguments, dataset=None, **trainer_kwargs) -> tuple[dict, list[dict]]:
    """Returns the trained weights and the logged history."""
    trainer = Trainer(model=model, args=args, train_dataset=dataset or TokenDataset(), **trainer_kwargs)
    trainer.train()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}, trainer.state.log_history


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["causal", "seq2seq"])
def test_gradient_accumulation_equals_one_big_batch(form, tmp_path):
    build = (lambda: tiny_lm("relative")) if form == "causal" else (lambda: tiny_seq2seq("relative"))
    dataset = TokenDataset()
    if form == "seq2seq":
        for example in dataset.examples:
            example["decoder_attention_mask"] = example["attention_mask"]
    big, big_log = train(build(), arguments(tmp_path / "big"), dataset)
    accumulated, accumulated_log = train(
        build(), arguments(tmp_path / "ga", per_device_train_batch_size=2, gradient_accumulation_steps=4), dataset
    )
    initial = build().state_dict()
    assert max(float((big[n] - initial[n]).abs().max()) for n in big) > 1e-3  # the step changed the weights
    assert_same_weights(accumulated, big)
    assert accumulated_log[0]["loss"] == pytest.approx(big_log[0]["loss"], rel=1e-4)


def test_label_smoothing_is_applied_to_the_shifted_tokens(tmp_path):
    """Trainer pops the labels and smooths itself; it must shift them for a causal LM (registered plugins are not in
    transformers' own list of causal LMs unless hf_relformer adds them)."""
    model = tiny_lm("relative")
    dataset = TokenDataset(count=8)
    batch = {key: torch.stack([example[key] for example in dataset.examples]) for key in dataset.examples[0]}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    smoothing = 0.2

    def smoothed(logits, labels):
        log_probs = -torch.log_softmax(logits, dim=-1)
        padding = labels == -100
        nll = log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(padding, 0)
        smooth = log_probs.sum(-1).masked_fill(padding, 0)
        count = (~padding).sum()
        return (1 - smoothing) * nll.sum() / count + smoothing * smooth.sum() / (count * logits.shape[-1])

    shifted = smoothed(logits[:, :-1], batch["labels"][:, 1:])
    unshifted = smoothed(logits, batch["labels"])
    _, log = train(model, arguments(tmp_path, label_smoothing_factor=smoothing, learning_rate=0.0), dataset)
    assert abs(shifted - unshifted) > 0.1
    assert log[0]["loss"] == pytest.approx(float(shifted), rel=1e-4)


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    plain, _ = train(tiny_lm("relative_values"), arguments(tmp_path / "plain"))
    model = tiny_lm("relative_values")
    checkpointed, _ = train(model, arguments(tmp_path / "ckpt", activation_checkpointing=True))
    assert model.model.gradient_checkpointing
    assert_same_weights(checkpointed, plain)


def test_resume_from_checkpoint_reaches_the_same_state(tmp_path):
    args = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2, optim="adamw_torch")
    args |= dict(learning_rate=1e-2, lr_scheduler_type="linear", train_sampling_strategy="random")
    straight, straight_log = train(tiny_lm("relative"), arguments(tmp_path / "straight", **args))
    assert (tmp_path / "straight" / "checkpoint-2" / "model.safetensors").is_file()
    model = tiny_lm("relative", seed=5)  # different weights: everything must come from the checkpoint
    trainer = Trainer(model=model, args=arguments(tmp_path / "straight", **args), train_dataset=TokenDataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert_same_weights(model.state_dict(), straight, atol=1e-6)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] == pytest.approx([e["loss"] for e in straight_log if "loss" in e][-1], rel=1e-5)


def test_bf16_autocast_training_stays_finite(tmp_path):
    model = tiny_lm("relative")
    weights, log = train(model, arguments(tmp_path, bf16=True, max_steps=2, learning_rate=0.05))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in log if "loss" in entry)
    model = tiny_lm("relative")
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(3, 64, (2, 300))  # longer than k and than one block of rows
    with torch.no_grad():
        full = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(ids).logits
    assert torch.isfinite(autocast).all()
    assert not torch.equal(autocast.float(), full)  # bf16 arithmetic really ran...
    assert (autocast.float() - full).abs().mean() < 0.05 * full.abs().mean()  # ...and stayed close


# ---------------------------------------------------------------------------------------------------------------
# Accelerate placement
# ---------------------------------------------------------------------------------------------------------------


def test_device_map_with_cpu_and_disk_offload_gives_the_same_outputs(tmp_path):
    model = tiny_lm("relative", num_hidden_layers=4, hidden_size=64, intermediate_size=128)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    placed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": int(2.5 * layer_bytes)},
        offload_folder=str(tmp_path / "offload"),
    )
    places = set(placed.hf_device_map.values())
    assert "disk" in places and "cpu" in places, placed.hf_device_map
    for name in placed.hf_device_map:  # _no_split_modules: a layer is placed whole, never split
        assert not name.startswith("model.layers.") or name.count(".") == 2, name
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    expected = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert placed.generate(ids[:1], max_new_tokens=8, do_sample=False).tolist() == expected.tolist()


def test_meta_device_and_low_memory_loading(tmp_path):
    model = tiny_lm("relative_values_per_head")
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        empty = RelformerForCausalLM(model.config)
    assert all(p.device.type == "meta" for p in empty.parameters())
    loaded = RelformerForCausalLM.from_pretrained(tmp_path, low_cpu_mem_usage=True)
    ids = torch.tensor([[5, 9, 3, 17, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
