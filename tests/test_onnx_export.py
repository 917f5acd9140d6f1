"""ONNX: `torch.onnx.export(..., dynamo=True)` of the decoder-only LM (logits only, no cache in the outputs) for
every scheme on its default backend, run by onnxruntime, gives PyTorch's logits. (Relative and T5 on SDPA failed to
export in 0.2.1: "Cannot view a tensor ... as (2, 8, 32)" at the attention output's reshape.)"""

import pytest
import torch

from helpers import SCHEMES, tiny_lm

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

IDS = torch.tensor([[5, 17, 33, 8, 41, 12, 9, 3, 30], [9, 23, 4, 50, 3, 7, 11, 12, 40]])


class LogitsOnly(torch.nn.Module):
    """What a user exports: a forward without a cache that returns the logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_onnx_export_runs_in_onnxruntime_with_pytorchs_logits(scheme, tmp_path):
    model = tiny_lm(scheme)
    mask = torch.ones_like(IDS)
    program = torch.onnx.export(LogitsOnly(model).eval(), (IDS, mask), dynamo=True, verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, padded = IDS.flip(-1), mask.clone()
    padded[1, :3] = 0  # other tokens, and left padding, than the export saw
    names = [argument.name for argument in session.get_inputs()]
    logits = session.run(None, dict(zip(names, (ids.numpy(), padded.numpy()), strict=True)))[0]
    with torch.no_grad():
        expected = model(ids, attention_mask=padded).logits
    real = padded.bool()
    torch.testing.assert_close(torch.from_numpy(logits)[real], expected[real], atol=1e-4, rtol=1e-4)
