"""Loading a Relformer checkpoint with errors that name the checkpoint and the problem (`load_checked`, behind
`RelformerPreTrainedModel.from_pretrained`), and how a checkpoint's tensors fit a model (`CheckpointFit`).

This file is shipped with every saved checkpoint (remote code): it imports only torch, safetensors and transformers.
"""

import dataclasses
import os
import pickle
from collections.abc import Callable, Collection, Mapping

from safetensors import SafetensorError
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


class CheckpointFitError(ValueError, RuntimeError):
    """A checkpoint's tensors do not fit the model its config describes. A `RuntimeError` as transformers raises for
    misshapen tensors, and a `ValueError` as Relformer raised before."""


def load_checked(load: Callable, pretrained_model_name_or_path, *model_args, **kwargs) -> tuple[nn.Module, dict | None]:
    """transformers' `from_pretrained` (`load`), with errors that name the checkpoint and the problem: no
    config.json, a damaged weight file, a pickle that would run code, and tensors that do not fit config.json (other
    shapes; tensors of the model body missing, which transformers would initialise at random with a warning; or body
    tensors the config has no place for). `ignore_mismatched_sizes=True` re-initialises misshapen tensors,
    `allow_missing_weights=True` missing ones (e.g. after changing `position_embedding_type`), and
    `allow_unused_weights=True` drops surplus ones (e.g. after turning `relative_attention_values` off); a head's own
    new layers (a classifier on a language model's checkpoint) are always allowed. With `output_loading_info=True`
    only misshapen tensors raise: the rest is in the returned info (and a warning). Returns (model, the loading info
    when `output_loading_info=True`, else None)."""

    allow_missing = kwargs.pop("allow_missing_weights", False)
    allow_unused = kwargs.pop("allow_unused_weights", False)
    allow_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
    wants_info = kwargs.pop("output_loading_info", False)
    where = f"checkpoint {str(pretrained_model_name_or_path)!r}"
    folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
    if kwargs.get("config") is None and os.path.isdir(folder) and not os.path.isfile(f"{folder}/config.json"):
        raise OSError(f"The {where} has no config.json: the folder is incomplete.")
    try:
        model, info = load(
            pretrained_model_name_or_path,
            *model_args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, by name
            **kwargs,
        )
    except SafetensorError as error:
        raise OSError(
            f"The weights of the {where} cannot be read: the .safetensors file is damaged or incomplete (an "
            f"interrupted download or copy?). Fetch or save it again. safetensors said: {error}"
        ) from error
    except pickle.UnpicklingError as error:
        raise OSError(
            f"The {where} has a pickle-based weight file (.bin / .pt) that holds more than tensors: loading it "
            "would run code, so it was refused (torch.load with weights_only=True). Use a .safetensors copy from "
            f"a source you trust. torch said: {pickle_refusal(error) or _last_line(error)}"
        ) from error
    # with output_loading_info the caller reads the report: only a shape mismatch still raises (as in transformers)
    fit = CheckpointFit.of_loading_info(info, counts=_body_keys(model))
    problems = fit.problems(allow_missing or wants_info, allow_mismatched, allow_unused or wants_info)
    if wants_info:
        unfit = fit.problems(allow_missing, True, allow_unused)
        if unfit:
            logger.warning(f"The tensors of the {where} do not all fit the model: {'; '.join(unfit)}.")
    if allow_mismatched and info.get("mismatched_keys"):
        shown = [f"{name} {tuple(stored)} -> {tuple(needed)}" for name, stored, needed in info["mismatched_keys"]]
        logger.warning(
            f"Re-initialised {len(shown)} tensor(s) of the {where} whose shape differs from this config "
            f"(ignore_mismatched_sizes=True): {', '.join(sorted(shown))}. Train them before use."
        )
    if problems:
        raise CheckpointFitError(
            f"The tensors of the {where} do not fit its config.json (an incomplete weight file, or a config "
            f"edited or copied from another checkpoint): {'; '.join(problems)}."
        )
    return model, (info if wants_info else None)


def _body_keys(model: nn.Module) -> Callable[[str], bool]:
    """Whether a key of the loading info belongs to the model body (keys of another head are not the body's): a
    head's body is under "model."; the bare model's, its own children."""
    prefix = model.base_model_prefix
    is_head = getattr(model, prefix, model) is not model
    children = {name for name, _ in model.named_children()}
    if is_head:
        return lambda key: key.startswith(f"{prefix}.")
    return lambda key: key.removeprefix(f"{prefix}.").split(".")[0] in children


@dataclasses.dataclass
class CheckpointFit:
    """How a checkpoint's tensors fit a model: the one check behind `from_pretrained`, the converters (a source's
    loading report) and the checks of a saved folder (`checkpoint_problems`: upload, card, upgrade). Names are sorted;
    `mismatched` holds (name, shape in the file, shape the model needs)."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @classmethod
    def of_loading_info(
        cls, info: dict, tied: Collection[str] = (), counts: Callable[[str], bool] = lambda key: True
    ) -> "CheckpointFit":
        """From transformers' loading info. Tied copies are never stored; `counts` keeps the missing and unexpected
        keys that matter (a head's body; all but what a converter reads by itself)."""
        return cls(
            missing=sorted(key for key in info.get("missing_keys") or () if key not in tied and counts(key)),
            unexpected=sorted(key for key in info.get("unexpected_keys") or () if counts(key)),
            mismatched=sorted(
                (key, tuple(stored), tuple(needed)) for key, stored, needed in info.get("mismatched_keys") or ()
            ),
        )

    @classmethod
    def of_shapes(cls, model: nn.Module, stored: Mapping[str, tuple[int, ...]]) -> "CheckpointFit":
        """Stored tensor shapes (name -> shape, e.g. from safetensors headers) against `model`'s state dict."""
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        return cls(
            missing=sorted(set(expected) - set(stored) - tied),
            unexpected=sorted(set(stored) - set(expected)),
            mismatched=sorted(
                (name, tuple(stored[name]), expected[name])
                for name in set(stored) & set(expected)
                if tuple(stored[name]) != expected[name]
            ),
        )

    def problems(
        self, allow_missing: bool = False, allow_mismatched: bool = False, allow_unused: bool = False
    ) -> list[str]:
        """What is wrong, as `from_pretrained` reports it (with the argument that allows each kind)."""
        problems = []
        if self.mismatched and not allow_mismatched:  # body or head: a trained classifier is not re-drawn silently
            shown = [f"{name} is {stored} in the file, {needed} here" for name, stored, needed in self.mismatched]
            problems.append(
                f"{len(shown)} tensor(s) of another shape ({_listed(shown)}; ignore_mismatched_sizes=True "
                "re-initialises them)"
            )
        if self.missing and not allow_missing:
            problems.append(
                f"{len(self.missing)} tensor(s) missing ({_listed(self.missing)}; allow_missing_weights=True "
                "initialises them at random)"
            )
        if self.unexpected and not allow_unused:
            problems.append(
                f"{len(self.unexpected)} tensor(s) the model has no place for ({_listed(self.unexpected)}; "
                "allow_unused_weights=True drops them)"
            )
        return problems


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def pickle_refusal(error: Exception) -> str | None:
    """The line of torch's weights-only refusal that names what was blocked (its other lines advise unsafe loading),
    or None when it names nothing."""
    return next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line), None)
