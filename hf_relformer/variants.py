"""The named variants of the position schemes that the tests, the demo and the benchmarks run, and the demo's one
knob, the horizon `k`.

Library code (not shipped with checkpoints): the schemes themselves are in `positions_relformer.py`, and a model
never needs its variant's name. A variant is a name and its config overrides; every scheme of the registry is a
variant under its own name, and the ones below are added. Adding a scheme adds nothing here unless it has variants
or a horizon.
"""

from .positions_relformer import POSITION_SCHEMES

# Variants besides the plain schemes: {name: config overrides}.
EXTRA_VARIANTS: dict[str, dict] = {
    "relative_values": {"position_embedding_type": "relative", "relative_attention_values": True},
    "relative_per_head": {"position_embedding_type": "relative", "relative_attention_per_head": True},
    "relative_values_per_head": {
        "position_embedding_type": "relative",
        "relative_attention_values": True,
        "relative_attention_per_head": True,
    },
}

# The extra variants the demo and the benchmarks run besides the plain schemes (the tests run them all).
FEATURED = ("relative_values",)


def _clipped_at(k: int) -> dict:
    return {"relative_attention_max_distance": k}


def _buckets_to(k: int) -> dict:
    # in a decoder, k buckets up to distance k give distances 0 .. k-1 a bucket each (k/2 exact, the rest log
    # spaced) and share the last one beyond: a scalar per head and distance, clipped like Shaw's tables
    return {"relative_attention_max_distance": k, "relative_attention_num_buckets": k}


# scheme name -> the config overrides that let it tell distances apart up to about k and no further (the demo's and
# the benchmarks' knob); a scheme without an entry has no such setting.
HORIZONS = {"relative": _clipped_at, "t5": _buckets_to}


def scheme_variants(featured_only: bool = False) -> dict[str, dict]:
    """`{variant name: config overrides}`: every scheme of the registry under its own name, each followed by its
    extra variants (with `featured_only`, only those in `FEATURED`)."""
    return {
        variant: overrides
        for scheme in POSITION_SCHEMES
        for variant, overrides in ({scheme: {"position_embedding_type": scheme}} | EXTRA_VARIANTS).items()
        if overrides["position_embedding_type"] == scheme
        and (variant == scheme or not featured_only or variant in FEATURED)
    }


def with_horizon(overrides: dict, k: int) -> dict:
    """A variant's config overrides plus its scheme's horizon `k` (unchanged for a scheme without one)."""
    horizon = HORIZONS.get(overrides["position_embedding_type"])
    return overrides | (horizon(k) if horizon else {})
