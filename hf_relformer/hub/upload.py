"""Validate a Relformer folder, then push it to the Hub (or any Hub-compatible endpoint) in one commit.

    relformer-upload FOLDER REPO_ID [--private] [--revision BRANCH [--create-branch]] [--commit-message MSG]
                     [--endpoint URL] [--token TOKEN] [--write-card] [--dry-run]

Nothing is sent before the folder passes every check (`validate_folder`). The token comes from `--token`, else the
usual `HF_TOKEN` / `huggingface-cli login`; the endpoint from `--endpoint`, else `HF_ENDPOINT`. Server errors (5xx)
and dropped connections are retried with backoff; client errors (401/403/404/409) are reported and not retried.
`upload_folder` makes one commit, so an interrupted push leaves the repository as it was.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from hf_relformer.checkpoint import (
    AUTO_CLASS_OF_FORM,
    MODEL_CODE,
    PICKLE_SUFFIXES,
    TOKENIZER_FILES,
    CheckpointError,
    UnreadableFile,
    checkpoint_problems,
    folder_shapes,
    is_hub_name,
    load_relformer_config,
    load_tokenizer,
)
from hf_relformer.commands import run_command

from .card import CardError, write_card

RETRIES, BACKOFF_SECONDS = 4, 2.0

# Loads the folder with trust_remote_code=True in a process where hf_relformer cannot be imported.
REMOTE_CHECK = """
import json, sys
sys.modules["hf_relformer"] = None
import torch, transformers
config = transformers.AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
form, auto = sys.argv[2], sys.argv[3]  # config.form, and the Auto class that loads it (AUTO_CLASS_OF_FORM)
model = getattr(transformers, auto).from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.tensor([[min(3, config.vocab_size - 1)] * 4])
inputs = {"input_ids": ids} if form != "encoder-decoder" else {"input_ids": ids, "decoder_input_ids": ids[:, :2]}
with torch.no_grad():
    out = model(**inputs)
values = out.logits if hasattr(out, "logits") else out.last_hidden_state
print(json.dumps({"finite": bool(torch.isfinite(values).all()), "class": type(model).__name__}))
"""


class UploadError(RuntimeError):
    """The upload was refused or failed: the message says why."""


@dataclass
class Validation:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# What Trainer writes beside a model (`save_model`, checkpoints, logs): never part of a shared model, so never sent.
TRAINING_ARTIFACTS = (
    "training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth",
    "checkpoint-*", "runs",
)  # fmt: skip


def files_to_send(folder: Path, exclude: tuple[str, ...] = ()) -> tuple[list[Path], list[str]]:
    """The files under `folder` that are sent (hidden ones never are), and the skipped entries: Trainer's artifacts
    and `exclude` patterns (fnmatch, against the path relative to `folder` or any folder on it; folders end in /)."""
    patterns = (*TRAINING_ARTIFACTS, *exclude)
    sent, skipped = [], set()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        prefixes = ["/".join(relative.parts[: i + 1]) for i in range(len(relative.parts))]
        match = next((p for p in prefixes if any(fnmatch.fnmatch(p, pattern) for pattern in patterns)), None)
        if match is None:
            sent.append(path)
        else:
            skipped.add(match + ("/" if match != relative.as_posix() else ""))
    return sent, sorted(skipped)


def validate_folder(
    folder: str | Path, write_card_if_missing: bool = False, remote_check: bool = True, exclude: tuple[str, ...] = ()
) -> Validation:
    """Every check a folder must pass before it is sent (problems), and what only deserves a warning. Trainer's
    artifacts and `exclude` patterns are skipped (see `files_to_send`)."""
    folder, result = Path(folder), Validation()
    if not folder.is_dir():
        result.problems.append(f"{folder} is not a folder.")
        return result
    config = check_config(folder, result)
    sent, _ = files_to_send(folder, exclude)
    pickles = sorted(p.relative_to(folder).as_posix() for p in sent if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        result.problems.append(f"pickle-based weight files would run code when loaded: {', '.join(pickles)}.")
    check_weights(folder, config, result)
    missing_code = [name for name in MODEL_CODE if not (folder / name).is_file()]
    if missing_code:
        result.problems.append(f"modeling code missing (needed for trust_remote_code): {', '.join(missing_code)}.")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        result.warnings.append("no tokenizer files: users will need a tokenizer from elsewhere.")
    elif config is not None:
        _check_tokenizer(folder, config, result)
    _check_card(folder, result, write_card_if_missing)
    if remote_check and result.ok and config is not None:
        _check_remote_load(folder, config, result)
    return result


def check_config(folder: Path, result: Validation):
    """The folder's `RelformerConfig`, or None with the reason added to `result.problems`."""
    try:
        return load_relformer_config(folder)
    except CheckpointError as error:
        result.problems.append(str(error))
        return None


def check_weights(folder: Path, config, result: Validation) -> None:
    """The safetensors can be read and (with a config) hold exactly the tensors, names and shapes, of its model."""
    try:
        stored = folder_shapes(folder)
    except UnreadableFile as error:
        result.problems.append(f"{error.path.name} cannot be read: {error.reason}")
        return
    except CheckpointError as error:  # no safetensors file
        result.problems.append(str(error))
        return
    if config is not None:
        result.problems.extend(checkpoint_problems(config, stored))


def _check_tokenizer(folder: Path, config, result: Validation) -> None:
    """Tokenizer files that are there must load and give ids the model has."""
    try:
        load_tokenizer(folder, "", config.vocab_size)
    except CheckpointError as error:
        result.problems.append(str(error))


def _check_card(folder: Path, result: Validation, write_card_if_missing: bool) -> None:
    card_path = folder / "README.md"
    if not card_path.is_file():
        if not write_card_if_missing:
            result.problems.append("README.md (model card) missing: pass --write-card to generate one.")
            return
        try:
            write_card(folder)
        except CardError as error:
            result.problems.append(f"cannot generate a model card: {error}")
            return
        result.warnings.append("README.md was missing: a model card was generated (review it).")
    try:  # parsed and checked locally (ModelCard.validate would ask the Hub)
        card = ModelCard.load(card_path, ignore_metadata_errors=False)
        ModelCardData(**card.data.to_dict())
    except Exception as error:  # huggingface_hub raises several types for bad metadata
        result.problems.append(f"README.md metadata is not a valid model card: {error}")
        return
    if not card.content.lstrip().startswith("---"):
        result.problems.append("README.md has no YAML metadata block.")
        return
    if card.data.get("library_name") != "transformers":
        result.warnings.append("the card's metadata does not say library_name: transformers.")


def run_without_package(script: str, folder: Path, *args: str) -> dict:
    """Run `script` (which makes hf_relformer unimportable) with `folder` and `args` in a fresh Python process, offline,
    with its own empty modules cache; return the JSON it prints last, or raise `RemoteLoadError` with its last error
    line."""
    with tempfile.TemporaryDirectory(prefix="relformer-modules-") as modules:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules}
        process = subprocess.run(
            [sys.executable, "-c", script, str(folder.resolve()), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=folder.parent,
            timeout=600,
        )
    if process.returncode != 0:
        raise RemoteLoadError((process.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(process.stdout.strip().splitlines()[-1])


class RemoteLoadError(RuntimeError):
    """The fresh process without hf_relformer failed: the message is its last error line."""


def _check_remote_load(folder: Path, config, result: Validation) -> None:
    try:
        report = run_without_package(REMOTE_CHECK, folder, config.form, AUTO_CLASS_OF_FORM[config.form])
    except RemoteLoadError as error:
        result.problems.append(f"the folder does not load with trust_remote_code=True without hf_relformer: {error}")
        return
    if not report["finite"]:
        result.problems.append("loaded with trust_remote_code=True, the model gives non-finite outputs.")


def upload(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_branch: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    write_card_if_missing: bool = False,
    dry_run: bool = False,
    exclude: tuple[str, ...] = (),
    api: HfApi | None = None,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Validate `folder`, then create `repo_id` (if needed) and upload the folder as one commit. Returns the commit
    URL (None for a dry run). Raises `UploadError` with the list of problems, or the reason the Hub refused."""
    folder = Path(folder)
    validation = validate_folder(folder, write_card_if_missing=write_card_if_missing, exclude=exclude)
    for warning in validation.warnings:
        log(f"warning: {warning}")
    if not validation.ok:
        raise UploadError("the folder is not ready to share:\n" + "\n".join(f"- {p}" for p in validation.problems))
    message = commit_message or f"Upload Relformer from {folder.name}"
    files, skipped = files_to_send(folder, exclude)
    if skipped:
        log(f"skipped (training artifacts and --exclude, not sent): {', '.join(skipped)}")
    if dry_run:
        target = endpoint or os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        log(
            f"Dry run: would upload {len(files)} files to {target}/{repo_id} ({'private' if private else 'public'}), "
            f"revision {revision or 'main'}{' (new branch)' if create_branch else ''}, message {message!r}:"
        )
        for path in files:
            log(f"  {path.relative_to(folder)}  {path.stat().st_size:,} bytes")
        return None
    api = api or HfApi(endpoint=endpoint, token=token)
    with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "create_repo", log, sleep)
    if create_branch:
        if not revision:
            raise UploadError("--create-branch needs --revision BRANCH.")
        with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), "create_branch", log, sleep)
    commit = with_retries(
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=message,
            allow_patterns=[path.relative_to(folder).as_posix() for path in files],  # exactly what was validated
        ),
        "upload_folder",
        log,
        sleep,
    )
    url = getattr(commit, "commit_url", str(commit))
    log(f"Uploaded {len(files)} files: {url}")
    return url


def with_retries(call: Callable, what: str, log: Callable[[str], None], sleep: Callable[[float], None]):
    """Retry transient failures (5xx, dropped connections) with exponential backoff; never client errors."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except HfHubHTTPError as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            if status is None or status >= 500:
                failure = f"{what}: server error {status}" if status else f"{what}: {error}"
            else:
                first_line = (str(error).strip().splitlines() or [""])[0]  # one `PROG: error:` line
                raise UploadError(
                    f"{what} refused by the Hub ({status}): {_client_error_hint(status)} {first_line}"
                ) from error
        except (ConnectionError, TimeoutError, OSError) as error:
            failure = f"{what}: connection failed ({error})"
        if attempt == RETRIES:
            raise UploadError(f"{failure}; gave up after {RETRIES + 1} attempts.")
        delay = BACKOFF_SECONDS * 2**attempt
        log(f"{failure}; retrying in {delay:.0f} s")
        sleep(delay)
    raise AssertionError("unreachable")


def _client_error_hint(status: int) -> str:
    return {
        401: "not logged in or invalid token (set HF_TOKEN or run `hf auth login`), or no such repository.",
        403: "the token may not write to this repository or organisation.",
        404: "repository or revision not found (does the branch exist? use --create-branch).",
        409: "conflict with the repository's current state (try again after it settles, or another revision).",
    }.get(status, "")


HUB_OPTIONS = ("revision", "commit_message", "token", "endpoint", "dry_run")


def add_hub_options(parser: argparse.ArgumentParser, dry_run_help: str) -> None:
    """The options every command that commits to the Hub takes (`HUB_OPTIONS`, passed on by `hub_options`)."""
    parser.add_argument("--revision", help="branch to commit to (default main)")
    parser.add_argument("--commit-message")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT, else huggingface.co)")
    parser.add_argument("--token", help="default: HF_TOKEN or the saved login")
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)


def check_hub_options(parser: argparse.ArgumentParser, args: argparse.Namespace, repo_id: str, name: str) -> None:
    """Usage errors (exit 2) for a repository id that is not owner/name and an endpoint that is not a URL."""
    if not is_hub_name(repo_id):
        parser.error(f"{name} must look like owner/name, got {repo_id!r}")
    if args.endpoint and not args.endpoint.startswith(("http://", "https://")):
        parser.error(f"--endpoint must be an http:// or https:// URL, got {args.endpoint!r}")


def hub_options(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in HUB_OPTIONS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relformer-upload", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("repo_id", help="owner/name on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--create-branch", action="store_true", help="create --revision if it does not exist")
    parser.add_argument("--write-card", action="store_true", help="generate README.md if the folder has none")
    parser.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="do not send files or folders matching PATTERN (fnmatch, relative to FOLDER; repeatable); Trainer's "
        f"artifacts are always skipped ({', '.join(TRAINING_ARTIFACTS)})",
    )  # fmt: skip
    add_hub_options(parser, "validate and print what would be sent; send nothing")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    check_hub_options(parser, args, args.repo_id, "repo_id")
    if args.create_branch and not args.revision:
        parser.error("--create-branch needs --revision")
    return run_command(
        "relformer-upload",
        lambda: upload(
            args.folder,
            args.repo_id,
            private=args.private,
            create_branch=args.create_branch,
            write_card_if_missing=args.write_card,
            exclude=tuple(args.exclude),
            **hub_options(args),
        ),
        (UploadError,),
        "nothing was committed by this run.",
    )


if __name__ == "__main__":
    raise SystemExit(main())
