"""Replace the code a saved Relformer checkpoint ships with the installed package's, then verify it without the package.

    relformer-upgrade PATH                 (also: python -m hf_relformer.hub.upgrade PATH)
    relformer-upgrade --repo-id ID [--revision REV] [--commit-message MSG] [--endpoint URL] [--token TOKEN] [--dry-run]

A checkpoint carries the modeling file and the files it imports (`MODEL_CODE`), and pipeline_relformer.py when a
pipeline was saved: loaded with `trust_remote_code=True` where the package is not
installed, that code runs, frozen as it was at save time. This command replaces those files (and config.json's
`auto_map`, `custom_pipelines` and `relformer_code_version` when they differ) and leaves every other file (weights,
tokenizer, card) untouched. The upgraded folder is built in a temporary sibling and verified there, in a fresh process
where hf_relformer cannot be imported: its outputs must equal the package's own classes on sample inputs, and cached
greedy generation (a left-padded batch of two rows) must equal an uncached forward. Only then does it replace the
folder (a rename); on any failure the folder is left byte-identical.

With `--repo-id`, only config.json and the code files are downloaded; verification runs on the model built from the
upgraded config with sample weights, and the changed files are pushed in one commit on top of the revision that was
read (retries, dry run and error messages as relformer-upload).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import CommitOperationAdd, HfApi

import hf_relformer
from hf_relformer import modeling_relformer
from hf_relformer.checkpoint import MODEL_CODE, CheckpointError, load_relformer_config, read_json
from hf_relformer.commands import run_command
from hf_relformer.configuration_relformer import AUTO_MAP, CODE_VERSION, CODE_VERSION_KEY
from hf_relformer.pipeline_relformer import TASK, RelformerText2TextPipeline
from hf_relformer.saving import ExtraFiles, save_pretrained_atomically

from .upload import (
    HUB_OPTIONS,
    RemoteLoadError,
    UploadError,
    Validation,
    add_hub_options,
    check_config,
    check_hub_options,
    check_weights,
    hub_options,
    run_without_package,
    with_retries,
)

PIPELINE_CODE = "pipeline_relformer.py"
PIPELINE_IMPL = f"{PIPELINE_CODE[:-3]}.{RelformerText2TextPipeline.__name__}"
PACKAGE_DIR = Path(hf_relformer.__file__).parent
OUTPUT_TOLERANCE, CACHE_TOLERANCE = 1e-5, 1e-4
NEW_TOKENS = 6

# Loads the folder with trust_remote_code=True where hf_relformer cannot be imported; prints its outputs on the sample
# inputs and, for a generating model, how far cached greedy generation is from one uncached forward over each row.
UPGRADE_CHECK = """
import json, sys
sys.modules["hf_relformer"] = None
import torch, transformers
folder, auto_name, inputs, new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids, mask = torch.tensor(inputs["input_ids"]), torch.tensor(inputs["attention_mask"])
seq2seq = model.config.is_encoder_decoder
with torch.no_grad():
    out = model(ids, attention_mask=mask, **({"decoder_input_ids": ids} if seq2seq else {}))
outputs = out.logits if hasattr(out, "logits") else out.last_hidden_state
cache_difference = None
if model.can_generate():
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached = torch.stack(generated.logits, dim=1)
    cache_difference = 0.0
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()][None]
        with torch.no_grad():
            if seq2seq:
                tokens = generated.sequences[row][None]
                uncached = model(prompt, decoder_input_ids=tokens[:, :-1], use_cache=False).logits[0]
            else:
                sequence = torch.cat([prompt, generated.sequences[row, -new_tokens:][None]], dim=1)
                uncached = model(sequence[:, :-1], use_cache=False).logits[0, prompt.shape[1] - 1:]
        cache_difference = max(cache_difference, float((cached[row] - uncached).abs().max()))
print(json.dumps({"outputs": outputs.tolist(), "cache_difference": cache_difference}))
"""


class UpgradeError(RuntimeError):
    """The upgrade was refused or its result failed verification: the message says why (nothing was changed)."""


@dataclass
class Plan:
    """What an upgrade changes: new file contents by name, and one line per change for the user."""

    files: dict[str, bytes] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    previous_version: str | None = None

    @property
    def empty(self) -> bool:
        return not self.files


def plan_upgrade(folder: Path) -> Plan:
    """Compare the folder's code files and config.json with the installed package's (a `CheckpointError` when the
    folder is not a Relformer checkpoint: no config.json, another model_type, a damaged or invalid config)."""
    config = load_relformer_config(folder)
    data = read_json(folder / "config.json")
    plan = Plan(previous_version=data.get(CODE_VERSION_KEY))
    pipelines = dict(data.get("custom_pipelines") or {})
    names = list(MODEL_CODE)
    if TASK in pipelines or (folder / PIPELINE_CODE).is_file():
        names.append(PIPELINE_CODE)
    for name in names:
        new, path = (PACKAGE_DIR / name).read_bytes(), folder / name
        old = path.read_bytes() if path.is_file() else None
        if old != new:
            plan.files[name] = new
            size = "added" if old is None else f"replaced ({len(old):,} -> {len(new):,} bytes)"
            plan.changes.append(f"{name}: {size}")
    updated = dict(data)
    updated["auto_map"] = {**(data.get("auto_map") or {}), **AUTO_MAP}
    if TASK in pipelines and isinstance(pipelines[TASK], dict):
        updated["custom_pipelines"] = {**pipelines, TASK: {**pipelines[TASK], "impl": PIPELINE_IMPL}}
    if plan.files or plan.previous_version != CODE_VERSION:
        updated[CODE_VERSION_KEY] = CODE_VERSION
    config_changes = [f"{key} updated" for key in ("auto_map", "custom_pipelines") if updated.get(key) != data.get(key)]
    if updated.get(CODE_VERSION_KEY) != data.get(CODE_VERSION_KEY):
        config_changes.append(f"{CODE_VERSION_KEY} {_version_name(plan.previous_version)} -> {CODE_VERSION}")
    if config_changes:
        plan.files["config.json"] = (json.dumps(updated, indent=2, sort_keys=True) + "\n").encode()
        plan.changes.append(f"config.json: {', '.join(config_changes)}")
    del config  # loaded only to refuse a folder that is not a valid Relformer checkpoint
    return plan


def _version_name(version: str | None) -> str:
    return version if version else "(none: saved before versions were recorded)"


def sample_inputs(vocab_size: int, pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Two rows of seeded ids, the first left-padded by two positions."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (2, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    input_ids[0, :2] = pad_token_id or 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def verify(folder: Path) -> str:
    """Load `folder` without hf_relformer in a fresh process: its outputs must equal the package's classes on the
    same weights, and its cached generation an uncached forward. Returns a one-line summary; `UpgradeError` if not."""
    config = load_relformer_config(folder)
    head = (config.architectures or ["RelformerModel"])[0]
    auto_name = next((auto for auto, ref in AUTO_MAP.items() if ref.endswith(f".{head}")), None)
    if auto_name is None or auto_name == "AutoConfig":
        raise UpgradeError(f"config.architectures names {head!r}, which is not a Relformer model class.")
    inputs = sample_inputs(config.vocab_size, config.pad_token_id)
    try:
        report = run_without_package(
            UPGRADE_CHECK, folder, auto_name, json.dumps({k: v.tolist() for k, v in inputs.items()}), str(NEW_TOKENS)
        )
    except RemoteLoadError as error:
        raise UpgradeError(f"the upgraded checkpoint does not load without hf_relformer: {error}") from error
    model = getattr(modeling_relformer, head).from_pretrained(folder).eval()
    extra = {"decoder_input_ids": inputs["input_ids"]} if config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(**inputs, **extra)
    expected = out.logits if hasattr(out, "logits") else out.last_hidden_state
    difference = float((torch.tensor(report["outputs"]) - expected).abs().max())
    if not difference <= OUTPUT_TOLERANCE:
        raise UpgradeError(
            f"loaded without hf_relformer, the upgraded checkpoint's outputs differ from the package's by "
            f"{difference:.3g} (tolerance {OUTPUT_TOLERANCE:g})."
        )
    summary = f"outputs equal the package's (max difference {difference:.1e})"
    cache_difference = report["cache_difference"]
    if cache_difference is not None:
        if not cache_difference <= CACHE_TOLERANCE:
            raise UpgradeError(
                f"loaded without hf_relformer, the upgraded checkpoint's cached generation differs from an uncached "
                f"forward by {cache_difference:.3g} (tolerance {CACHE_TOLERANCE:g})."
            )
        summary += f", cached generation equals uncached (max difference {cache_difference:.1e})"
    return summary


class _LinkedCopy:
    """The folder's files, except those named, hard-linked (else copied) into the folder being written: they are
    never written to, so the originals stay untouched and large weights cost no copy."""

    def __init__(self, folder: Path, replaced: set[str]):
        self.folder, self.replaced = folder, replaced

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        def ignore(directory: str, names: list[str]) -> list[str]:
            return [name for name in names if Path(directory) == self.folder and name in self.replaced]

        shutil.copytree(
            self.folder, save_directory, symlinks=True, ignore=ignore, dirs_exist_ok=True, copy_function=_link_or_copy
        )


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class _Verification:
    """Runs `verify` on the complete staging folder, last, so that a failure leaves the original folder in place."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        self.log(f"verified without hf_relformer: {verify(Path(save_directory))}")


def _refuse_unless_checkpoint(folder: Path) -> None:
    """Refuse, with every reason, a folder that is not a readable Relformer checkpoint (config and weights)."""
    result = Validation()
    config = check_config(folder, result)
    check_weights(folder, config, result)
    if not result.ok:
        raise UpgradeError(
            f"{folder} is not a Relformer checkpoint that can be upgraded (nothing was changed): "
            + " ".join(result.problems)
        )


def _report(where: str, plan: Plan, log: Callable[[str], None]) -> None:
    log(f"{where}: code {_version_name(plan.previous_version)} -> hf_relformer {CODE_VERSION}")
    for change in plan.changes:
        log(f"  {change}")


def upgrade_folder(folder: str | Path, *, log: Callable[[str], None] = print) -> bool:
    """Upgrade the code files of a saved folder in place (atomically, verified first). Returns whether it changed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UpgradeError(f"{folder} is not a folder.")
    _refuse_unless_checkpoint(folder)
    plan = plan_upgrade(folder)
    if plan.empty:
        log(f"{folder}: already up to date (code of hf_relformer {CODE_VERSION}); nothing changed.")
        return False
    _report(str(folder), plan, log)
    try:
        save_pretrained_atomically(
            folder, _LinkedCopy(folder.resolve(), set(plan.files)), ExtraFiles(plan.files), _Verification(log)
        )
    except OSError as error:
        raise UpgradeError(f"cannot write {folder}: {error}; {folder} is unchanged.") from error
    log(f"Upgraded {folder}; weights, tokenizer and card untouched.")
    return True


def upgrade_repo(
    repo_id: str,
    *,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Upgrade the code files of a Hub repository: fetch config.json and the code files only, upgrade and verify them,
    push the changed files in one commit whose parent is the revision read. Returns the commit URL (None when nothing
    changed or for a dry run)."""
    api = api or HfApi(endpoint=endpoint, token=token)
    info = with_retries(lambda: api.model_info(repo_id, revision=revision or "main"), "model_info", log, sleep)
    present = {sibling.rfilename for sibling in info.siblings or []}
    if "config.json" not in present:
        raise UpgradeError(f"{repo_id} has no config.json: it is not a Relformer checkpoint (nothing was changed).")
    with tempfile.TemporaryDirectory(prefix="relformer-upgrade-") as work:
        folder = Path(work) / repo_id.split("/")[-1]
        for name in ["config.json", *(n for n in (*MODEL_CODE, PIPELINE_CODE) if n in present)]:
            with_retries(
                lambda name=name: api.hf_hub_download(repo_id, name, revision=info.sha, local_dir=folder),
                f"download {name}",
                log,
                sleep,
            )
        plan = plan_upgrade(folder)
        where = f"{repo_id}@{info.sha[:12]}"
        if plan.empty:
            log(f"{where}: already up to date (code of hf_relformer {CODE_VERSION}); nothing to commit.")
            return None
        _report(where, plan, log)
        ExtraFiles(plan.files).save_pretrained(folder)
        _write_sample_weights(folder)
        log(f"verified without hf_relformer (on sample weights): {verify(folder)}")
        message = commit_message or f"Upgrade Relformer code to hf_relformer {CODE_VERSION} (relformer-upgrade)"
        if dry_run:
            target = endpoint or os.environ.get("HF_ENDPOINT", "https://huggingface.co")
            log(
                f"Dry run: would commit {', '.join(plan.files)} to {target}/{repo_id} on {info.sha}, "
                f"message {message!r}; nothing was sent."
            )
            return None
        operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=content) for n, content in plan.files.items()]
        push = functools.partial(
            api.create_commit, repo_id, operations, commit_message=message, revision=revision, parent_commit=info.sha
        )
        commit = with_retries(push, "create_commit", log, sleep)
    url = getattr(commit, "commit_url", str(commit))
    log(f"Committed {len(plan.files)} files: {url}")
    return url


def _write_sample_weights(folder: Path) -> None:
    """A model.safetensors for the folder's config with large seeded weights (greedy decoding then depends on the
    context, so a broken cache would show), built with the package's classes."""
    config = load_relformer_config(folder)
    model = getattr(modeling_relformer, (config.architectures or ["RelformerModel"])[0])(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(folder / "sample-weights")
    shutil.move(folder / "sample-weights" / "model.safetensors", folder / "model.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relformer-upgrade", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", help="a saved checkpoint folder (or use --repo-id)")
    parser.add_argument("--repo-id", help="upgrade this Hub repository (owner/name) instead of a folder")
    add_hub_options(parser, "with --repo-id: upgrade and verify, print what would be committed; send nothing")
    args = parser.parse_args(argv)
    if (args.folder is None) == (args.repo_id is None):
        parser.error("give either a folder or --repo-id ID")
    errors = (UpgradeError, UploadError, CheckpointError)
    if args.repo_id is not None:
        check_hub_options(parser, args, args.repo_id, "--repo-id")
        work = lambda: upgrade_repo(args.repo_id, **hub_options(args))  # noqa: E731
        return run_command("relformer-upgrade", work, errors, "nothing was committed by this run.")
    hub_only = [f"--{name.replace('_', '-')}" for name in HUB_OPTIONS if getattr(args, name)]
    if hub_only:
        parser.error(f"{', '.join(hub_only)} apply only with --repo-id")
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    return run_command("relformer-upgrade", lambda: upgrade_folder(args.folder), errors, f"{args.folder} is unchanged.")


if __name__ == "__main__":
    raise SystemExit(main())
