"""Deriving the draft: the target's params with INT4 group-wise weights.

`make_draft` is applied once; `save_draft` / `load_draft` keep the result beside the
target checkpoint so later runs skip quantization.
"""

from __future__ import annotations

import dataclasses
import warnings

from qspec_jax.model import Params
from qspec_jax.quant_weights import QuantizedWeight, check_group_size, quantize_rtn

ATTN_WEIGHTS = ("wqkv", "wo")  # LayerParams fields (q/k/v and gate/up are fused)
MLP_WEIGHTS = ("w_gate_up", "w_down")
SCOPES = ("all", "mlp")


@dataclasses.dataclass(frozen=True)
class DraftRecipe:
    """Which weights become INT4 and how (frozen, hashable).

    group_size: input rows per quantization group of a weight [in, out] (even; the paper
      uses 128; 64 and 32 are finer and larger).
    scope: "all" linear layers (default) or "mlp" only (what the released code does).
    quantize_lm_head: the lm_head too (for tied embeddings, an INT4 copy of embed^T).
    method: "rtn" round-to-nearest, or "gptq" (needs calibration tokens).
    """

    group_size: int = 128
    scope: str = "all"
    quantize_lm_head: bool = True
    method: str = "rtn"

    def __post_init__(self):
        check_group_size(self.group_size)
        if self.scope not in SCOPES:
            raise ValueError(f"draft scope must be one of {SCOPES}, got {self.scope!r}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"draft method must be 'rtn' or 'gptq', got {self.method!r}")

    def weight_names(self) -> tuple[str, ...]:
        return MLP_WEIGHTS if self.scope == "mlp" else ATTN_WEIGHTS + MLP_WEIGHTS


def make_draft(params: Params, recipe: DraftRecipe = DraftRecipe(), *, quantizer=None) -> Params:
    """Target params -> draft params: the same `Params` with the recipe's weights replaced
    by INT4 `QuantizedWeight` leaves (round-to-nearest, asymmetric, per group of
    G = `recipe.group_size` input rows; layout in `qspec_jax.quant_weights`). Every other
    tensor (embedding, norms) is the target's own array.

    quantizer(name, layer_index, w) -> QuantizedWeight overrides round-to-nearest (GPTQ).
    To keep a draft on disk beside its checkpoint, use `get_or_make_draft`.
    """
    if recipe.method == "gptq" and quantizer is None:
        raise ValueError("method='gptq' needs calibration: use qspec_jax.gptq.make_gptq_draft")
    quant = quantizer or (lambda name, i, w: quantize_rtn(w, recipe.group_size))
    in_dims = {w.shape[0] for layer in params.layers for w in (layer.wqkv, layer.w_down)}
    for k in sorted(in_dims):
        if k % recipe.group_size:
            warnings.warn(f"input dimension {k} is not a multiple of the weight group size "
                          f"{recipe.group_size}: its last group is ragged (zero padded)", stacklevel=2)
    layers = []
    for i, layer in enumerate(params.layers):
        upd = {n: quant(n, i, getattr(layer, n)) for n in recipe.weight_names()}
        layers.append(layer.replace(**upd))
    lm_head = params.lm_head
    if recipe.quantize_lm_head:
        head = params.embed.T if lm_head is None else lm_head
        lm_head = quant("lm_head", -1, head)
    return params.replace(layers=tuple(layers), lm_head=lm_head)


def is_draft(params: Params) -> bool:
    """True if any layer weight is an INT4 QuantizedWeight."""
    return any(isinstance(getattr(l, n), QuantizedWeight) for l in params.layers for n in ATTN_WEIGHTS + MLP_WEIGHTS)
