"""Named ViT variants: the architecture hyper-parameters of the published models.

Names follow the paper: size/patch (B/16 is ViT-Base with 16x16 patches). `configs/models.py` exposes the
same table as ml_collections configs; this module keeps it importable without the configs directory.
"""

_SIZES = {
    # name: (hidden_size, mlp_dim, num_heads, num_layers)
    "testing": (32, 64, 2, 2),
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
}
_PUBLISHED = ("Ti/16", "S/16", "S/32", "B/16", "B/32", "B/8", "L/16", "L/32", "H/14")


def _variant(size: str, patch: int) -> dict:
  hidden, mlp, heads, layers = _SIZES[size]
  return dict(patch_size=(patch, patch), hidden_size=hidden, mlp_dim=mlp, num_heads=heads,
              num_layers=layers)


MODEL_VARIANTS: dict[str, dict] = {
    name: _variant(name.split("/")[0], int(name.split("/")[1])) for name in _PUBLISHED}
# A tiny model for tests and the built-in CPU job: 2 layers of width 32.
MODEL_VARIANTS["testing"] = _variant("testing", 4)


def variant(name: str) -> dict:
  """The architecture fields of a named variant, or a ValueError that lists the names there are."""
  try:
    return dict(MODEL_VARIANTS[name])
  except KeyError:
    raise ValueError(f"unknown model name {name!r}: choose one of {', '.join(MODEL_VARIANTS)}.") from None
