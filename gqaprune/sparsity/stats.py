"""Per-linear input statistics of one decoder layer, accumulated with forward hooks.

For a linear with input X [tokens, in] over the calibration set:
* ``col_sq`` [in]  = sum_t x_tj^2 (float32) — Wanda's ||X_j||_2^2;
* ``hessian`` [in, in] = X^T X (``dtype``, float32 by default) — SparseGPT's H (divided by the
  token count when read, so its scale does not grow with the calibration set).

q/k/v read the same normed hidden state, and so do gate/up (Llama / Qwen2 / Mistral layers), so
their statistics are accumulated once (``SHARED_INPUT``): four inputs per layer, not seven.
Hooks sit on this layer's linears only, for the duration of :func:`collect`.
Memory: sum over the four inputs of in (col_sq) and, with the Hessian, in^2 entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gqaprune import arch

# projection -> the projection whose input it shares (same tensor in the layer's forward)
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def source(name: str) -> str:
    return SHARED_INPUT.get(name, name)


@dataclass
class LayerStats:
    col_sq: dict[str, torch.Tensor] = field(default_factory=dict)    # source -> [in]
    hessian: dict[str, torch.Tensor] = field(default_factory=dict)   # source -> [in, in] (sum)
    tokens: int = 0

    def col_sq_of(self, name: str) -> torch.Tensor:
        return self.col_sq[source(name)]

    def hessian_of(self, name: str) -> torch.Tensor:
        """Mean X^T X / tokens [in, in] for projection ``name``."""
        return self.hessian[source(name)] / max(1, self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.col_sq, self.hessian) for t in d.values())


@torch.no_grad()
def collect(layer, inputs: list[torch.Tensor], kwargs: list[dict], hessian: bool = False,
            dtype: torch.dtype = torch.float32) -> tuple[LayerStats, list[torch.Tensor]]:
    """Run ``layer`` on every chunk of ``inputs`` ([b, T, H] each) with hooks on its linears.

    Returns the statistics and the layer's outputs per chunk (valid as the next layer's inputs
    only while the layer is unchanged).
    """
    stats = LayerStats()
    sources = {name: lin for name, lin in arch.named_linears(layer) if name not in SHARED_INPUT}

    def hook(name):
        def pre(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])                      # [b*T, in]
            xf = x.float()
            sq = (xf * xf).sum(0)                                           # [in]
            if name in stats.col_sq:
                stats.col_sq[name] += sq
            else:
                stats.col_sq[name] = sq
            if hessian:
                xh = x.to(dtype)
                if name not in stats.hessian:
                    stats.hessian[name] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
                stats.hessian[name].addmm_(xh.T, xh)
        return pre

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in sources.items()]
    try:
        outputs = [arch.run_layer(layer, h, k) for h, k in zip(inputs, kwargs)]
    finally:
        for handle in handles:
            handle.remove()
    stats.tokens = sum(h.shape[0] * h.shape[1] for h in inputs)
    return stats, outputs
