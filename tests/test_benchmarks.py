"""The benchmark suite compares like with like: its naive Shaw baseline computes what the model computes, and its
bookkeeping (ratios, targets, usage errors) is right. No timing here: times are shown by `python -m benchmarks`."""

import pytest
import torch

from benchmarks.naive_shaw import naive_shaw_attention
from benchmarks.run import main, make_row, relformer_config
from hf_relformer import RelformerModel, attention_relformer
from hf_relformer.positions_relformer import DistanceGrid

from helpers import redraw_weights


@pytest.mark.parametrize("blocks", [False, True])
def test_naive_baseline_equals_the_model_attention(blocks, monkeypatch):
    if blocks:  # the path long inputs take
        monkeypatch.setattr(attention_relformer, "BLOCK_ELEMENTS", 4 * 40 * 5)
        monkeypatch.setattr(attention_relformer, "MIN_BLOCK_ROWS", 1)
        monkeypatch.setattr(DistanceGrid, "WHOLE_LIMIT", 0)
    shape = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    config = relformer_config(shape, "relative", relative_attention_max_distance=6)
    torch.manual_seed(0)
    model = redraw_weights(RelformerModel._from_config(config, attn_implementation="sdpa"))
    attention = model.layers[0].self_attn
    hidden = torch.randn(1, 40, 32)
    _, index = model.embed_positions(hidden, torch.arange(40)[None], 0, 40)
    with torch.no_grad():
        ours = attention(hidden, None, index)[0]
        view = (1, 40, -1, config.head_dim)
        q, k, v = (p(hidden).view(view).transpose(1, 2) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        naive = naive_shaw_attention(q, k, v, attention.position.relative_key_table, 6)
        expected = attention.o_proj(naive.transpose(1, 2).reshape(1, 40, -1))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_rows_compare_with_the_target_in_the_right_direction():
    assert make_row("P1", "time", 1.2, 1.0, "s", "<= 1.25").ok
    assert not make_row("P1", "time", 1.3, 1.0, "s", "<= 1.25").ok
    assert make_row("P4", "speed", 95.0, 100.0, "tok/s", ">= 0.9").ok
    assert not make_row("P4", "speed", 85.0, 100.0, "tok/s", ">= 0.9").ok


def test_unknown_case_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "P9"])
    assert exit_info.value.code == 2
    assert "P9" in capsys.readouterr().err


def test_skew_and_gather_give_the_same_keys_term():
    from benchmarks.naive_shaw import gathered_relative_logits, skewed_relative_logits

    torch.manual_seed(0)
    query, table = torch.randn(2, 3, 17, 8), torch.randn(5 + 1, 8)
    causal = torch.ones(17, 17).tril().bool()
    skewed, gathered = skewed_relative_logits(query, table, 5), gathered_relative_logits(query, table, 5)
    torch.testing.assert_close(skewed[..., causal], gathered[..., causal])


def test_gpu_script_runs_every_case_on_cpu(tmp_path):
    """`python -m benchmarks.gpu --smoke`: the P8/P9 script, ready for a GPU, runs its cases end to end at toy sizes
    and writes one row per case, with the ratio against no-position flex for the two targets."""
    import json

    from benchmarks.gpu import CASES, NAIVE, TARGETS
    from benchmarks.gpu import main as gpu_main

    output = tmp_path / "results-gpu.json"
    assert gpu_main(["--smoke", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert [row["case"] for row in rows] == [name for name, _, _ in CASES] + [NAIVE]
    assert all(row["seconds"] > 0 for row in rows)
    assert {row["case"] for row in rows if "ratio" in row} == set(TARGETS)


def test_gpu_script_refuses_without_a_gpu(capsys):
    from benchmarks.gpu import main as gpu_main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        gpu_main(["--lengths", "64"])
    assert exit_info.value.code == 2 and "--smoke" in capsys.readouterr().err
