"""Converters from other checkpoints to Relformer checkpoints, each verified numerically against its source.

    python -m hf_relformer.conversion SOURCE INPUT OUTPUT [options]      (also installed as `relformer-convert`)

or from Python: `hf_relformer.conversion.convert("gpt2", "path/to/gpt2", "path/to/out")`. Sources: see `SOURCES`.

A source is one module that declares a `source.Source` (a `TransformersSource` for a saved transformers model: the
settings it refuses, its architectures, the Relformer config and the tensor mapping), plus its line in
`api.REGISTERED`; loading, verifying, writing, the CLI's help and its flag checks come from there.
"""

from .api import SOURCES, convert
from .common import TOLERANCE, ConversionError, Options

__all__ = ["SOURCES", "TOLERANCE", "ConversionError", "Options", "convert"]
