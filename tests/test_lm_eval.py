"""lm-evaluation-harness (the `eval` extra): `lm_eval.simple_evaluate(model="hf", model_args="pretrained=<folder>,
trust_remote_code=True")` on a saved Relformer, in a process where hf_relformer cannot be imported (the checkpoint's
own code runs), on two local tasks (YAML and JSONL written here: no download): a multiple-choice task and a rolling
loglikelihood (perplexity) task. Every loglikelihood it reports is the one the model gives directly."""

import json
import math
import os

import pytest
import torch
from transformers import GPT2TokenizerFast

from hf_relformer import RelformerForCausalLM
from hf_relformer.saving import save_pretrained_atomically

from helpers import redraw_weights, run_script, tiny_config

pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "a small dog"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 1},
    {
        "question": "Relative positions let attention",
        "choices": ["see distances", "ignore order", "sleep"],
        "answer": 2,
    },
    {"question": "Bach wrote", "choices": ["chorales", "novels"], "answer": 0},
]
TEXTS = [
    {"text": "Shaw's attention adds a learned vector for each clipped distance between two tokens."},
    {"text": "To be, or not to be, that is the question."},
    {"text": "A short one."},
]

TASKS = {
    "relformer_choice.yaml": """
task: relformer_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/choice.jsonl
  cache_dir: {folder}/datasets
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "relformer_perplexity.yaml": """
task: relformer_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/perplexity.jsonl
  cache_dir: {folder}/datasets
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
""",
}

# As a user without the package would run it: the checkpoint's own code, through lm-eval's HF model.
EVAL_SCRIPT = """
import json, sys
sys.modules["hf_relformer"] = None
import lm_eval
from lm_eval.tasks import TaskManager
folder, tasks = sys.argv[1], TaskManager(include_path=sys.argv[2], include_defaults=False)
out = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={folder},trust_remote_code=True", tasks=["relformer_choice",
    "relformer_perplexity"], task_manager=tasks, batch_size=2, device="cpu", log_samples=True, bootstrap_iters=0,
)
samples = {name: [[list(r) if isinstance(r, (list, tuple)) else r for r in s["filtered_resps"]]
                  for s in sorted(found, key=lambda s: s["doc_id"])] for name, found in out["samples"].items()}
remote = [name for name in sys.modules if name.startswith("transformers_modules") and "modeling_relformer" in name]
print(json.dumps({"results": out["results"], "samples": samples, "remote": remote}))
"""


@pytest.fixture(scope="module")
def evaluated(gpt2_tokenizer_path, tmp_path_factory):
    """A tiny Relformer with the GPT-2 tokenizer saved to a folder, the tasks, and lm-eval's answer."""
    work = tmp_path_factory.mktemp("lm_eval")
    tokenizer = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_path)
    eos = tokenizer.eos_token_id
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=eos, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = redraw_weights(RelformerForCausalLM(config), std=0.3)
    folder = save_pretrained_atomically(work / "relformer", model, tokenizer)
    (work / "choice.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in QUESTIONS))
    (work / "perplexity.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in TEXTS))
    (work / "tasks").mkdir()
    for name, text in TASKS.items():
        (work / "tasks" / name).write_text(text.format(folder=work))
    env = {"HF_MODULES_CACHE": str(work / "modules"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env |= {"HF_DATASETS_CACHE": str(work / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    output = run_script(EVAL_SCRIPT, [str(folder), str(work / "tasks")], {**os.environ, **env}, work)
    return model, tokenizer, output


@torch.no_grad()
def loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) summed over its tokens, and whether greedy decoding would produce it."""
    ids = torch.tensor([context + continuation])
    log_probs = model(ids[:, :-1]).logits.float().log_softmax(-1)[0, len(context) - 1 :]
    target = torch.tensor(continuation)
    return float(log_probs.gather(-1, target[:, None]).sum()), bool((log_probs.argmax(-1) == target).all())


def test_remote_code_ran(evaluated):
    _, _, output = evaluated
    assert output["remote"], "lm-eval did not load the checkpoint's own modeling code"


def test_multiple_choice_loglikelihoods_and_accuracy(evaluated):
    model, tokenizer, output = evaluated
    reported = output["samples"]["relformer_choice"]
    assert len(reported) == len(QUESTIONS)
    correct = 0
    for doc, answers in zip(QUESTIONS, reported, strict=True):
        context = tokenizer(doc["question"]).input_ids
        expected = []
        for choice in doc["choices"]:  # lm-eval's split: the context's tokens, then the rest of the whole's
            whole = tokenizer(doc["question"] + " " + choice).input_ids
            assert whole[: len(context)] == context
            expected.append(loglikelihood(model, context, whole[len(context) :]))
        assert [value for value, _ in answers] == pytest.approx([value for value, _ in expected], rel=1e-4, abs=1e-4)
        assert [greedy for _, greedy in answers] == [greedy for _, greedy in expected]
        correct += max(range(len(expected)), key=lambda i: expected[i][0]) == doc["answer"]
    assert 0 < correct < len(QUESTIONS)  # the accuracy below is not trivially 0 or 1
    assert output["results"]["relformer_choice"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))


def test_rolling_loglikelihoods_and_perplexity(evaluated):
    """Each document scored from its first token on, after the end-of-text token (lm-eval's prefix), in one window:
    every document is shorter than max_position_embeddings, which lm-eval takes as the model's length."""
    model, tokenizer, output = evaluated
    reported = output["samples"]["relformer_perplexity"]
    total, words = 0.0, 0
    for doc, (value,) in zip(TEXTS, reported, strict=True):
        ids = tokenizer(doc["text"]).input_ids
        assert len(ids) < model.config.max_position_embeddings
        expected, _ = loglikelihood(model, [tokenizer.eos_token_id], ids)
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-4)
        total, words = total + expected, words + len(doc["text"].split())
    perplexity = output["results"]["relformer_perplexity"]["word_perplexity,none"]
    assert perplexity == pytest.approx(math.exp(-total / words), rel=1e-3)
