"""`relformer-text2text`: text in, generated text out, for encoder-decoder Relformers.

transformers 5 removed the text2text-generation / translation / summarization pipelines. This one is registered
under its own task name when `hf_relformer` is imported, and `pipe.save_pretrained(folder)` ships this file with
the checkpoint (`config.custom_pipelines`), so `pipeline("relformer-text2text", model=folder,
trust_remote_code=True)` works where the package is not installed. Imports only torch and transformers.
"""

from typing import Any

import torch
from transformers import Pipeline

TASK = "relformer-text2text"


class RelformerText2TextPipeline(Pipeline):
    """`pipe("text", **generate_kwargs)` -> `[{"generated_text": str}]` (one dict per returned sequence);
    `pipe(["text", ...])` -> one such list per input, flattened to one dict per input when each input has one
    sequence: the transformers 4 text2text pipeline's outputs."""

    _pipeline_calls_generate = True

    def __call__(self, inputs: str | list[str], **kwargs: Any) -> list:
        result = super().__call__(inputs, **kwargs)
        if (
            isinstance(inputs, list)
            and all(isinstance(text, str) for text in inputs)
            and all(len(sequences) == 1 for sequences in result)
        ):
            return [sequences[0] for sequences in result]
        return result

    def _sanitize_parameters(self, truncation: bool | None = None, max_length: int | None = None, **generate_kwargs):
        preprocess_params = {}
        if truncation is not None:
            preprocess_params["truncation"] = truncation
        if max_length is not None:
            generate_kwargs["max_length"] = max_length
        return preprocess_params, generate_kwargs, {}

    def preprocess(self, text: str, truncation: bool = False) -> dict[str, torch.Tensor]:
        if not isinstance(text, str):
            raise TypeError(f"{TASK} takes a string or a list of strings, got {type(text).__name__}.")
        return self.tokenizer(text, return_tensors="pt", truncation=truncation)

    def _forward(self, model_inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> dict[str, torch.Tensor]:
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        batch_size = model_inputs["input_ids"].shape[0]
        output_ids = self.model.generate(**model_inputs, **generate_kwargs)
        return {"output_ids": output_ids.reshape(batch_size, -1, output_ids.shape[-1])}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> list[dict[str, str]]:
        return [
            {"generated_text": self.tokenizer.decode(ids, skip_special_tokens=True)}
            for ids in model_outputs["output_ids"][0]
        ]
