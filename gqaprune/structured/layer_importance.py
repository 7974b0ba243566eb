"""Layer and block importance: how much each decoder layer (or its attention / MLP block) matters.

Two measures, both over calibration samples ``ids`` [N, T]:

* ``removal``: how much the causal-LM loss grows when the layer (block) is skipped::

      I_l = NLL_skip(l) - NLL_base = ln(PPL_skip(l) / PPL_base)      (nats per predicted token)

  i.e. the relative perplexity increase on a log scale, which is scale-free across models (a
  skipped first layer can multiply perplexity by 1000 while others add 5%; the log keeps the
  per-layer rate allocation from being decided by that one layer alone). Skipping a block means
  the residual stream passes it unchanged: ``h + attn(norm(h))`` becomes ``h``.

* ``activation``: how much the layer (block) changes the residual stream, averaged over all
  tokens but the first (position 0 is BOS, whose activations are outliers in most LLMs)::

      I_l = mean_t (1 - cos(h_in[t], h_out[t]))

  for a layer (h_in -> h_out), the attention block (h_in -> h_mid) or the MLP block
  (h_mid -> h_out). One forward pass in total.

Cost of ``removal`` (why it meets "one forward pass per layer"): the decoder layers run once, layer
by layer, and the hidden state entering layer l is reused for the branch that skips l: the branch
runs only layers l+1..L-1 plus the final norm and LM head. Per mini-batch:

* layer granularity: L (base pass) + sum_l (L-1-l) = L(L+1)/2 decoder-layer forwards and L+1 head
  evaluations, i.e. (L+1)/2 full forward passes for L layers (naive re-running: L passes).
* block granularity: L + L/2 (the attention-skip branch's own MLP) + 2 * L(L-1)/2 = L^2 + L/2
  decoder-layer forwards and 2L+1 head evaluations, i.e. under one full pass per block (2L blocks).

Plus one check: on the first mini-batch the hand-run loss is compared with ``model(...).loss``
(one extra forward), so an architecture whose forward differs is caught instead of silently
producing wrong importances. Memory: the calibration set's hidden states entering layer 0, and
one hidden state per branch of one mini-batch.

Masks, rotary embeddings and per-layer sliding windows (Qwen2 ``layer_types``, Mistral
``sliding_window``) are not rebuilt here: the layer walker (``gqaprune.calibrate.capture``) records
what the model's own forward passes each layer, and the layers run with exactly those kwargs.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gqaprune.errors import UserError
from gqaprune.registry import Registry
from gqaprune import arch
from gqaprune.calibrate import capture, next_token_nll, run_from
from gqaprune.structured.units import LayerShape, model_shapes

# method -> (model, ids [N, T], granularity, batch_size) -> (layer, attn, mlp, details, granularity filled)
IMPORTANCE_METHODS: Registry = Registry("importance_method")
GRANULARITIES = ("layer", "block")
CONFIG_FORMAT = "gqaprune.layer_importance/v1"


# ---- the result and its config file --------------------------------------------------------

@dataclass
class LayerImportance:
    """Importance per layer ([L]) and/or per block (attn [L], mlp [L]); larger = more important."""
    method: str
    granularity: str                  # "layer", "block" or "both": which lists are filled
    model: str                        # model identity (HF id or resolved directory)
    num_layers: int
    shapes: list[dict]                # LayerShape.to_dict() per layer
    layer: list[float] | None = None
    attn: list[float] | None = None
    mlp: list[float] | None = None
    details: dict = field(default_factory=dict)  # perplexities, samples, cost, calibration data

    def covers(self, granularity: str) -> bool:
        return self.granularity in (granularity, "both")

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "LayerImportance":
        if data.get("format") != CONFIG_FORMAT:
            raise UserError(f"not a layer importance config (format {data.get('format')!r})",
                            "pass a layer_importance_config.json written by a layerwise/blockwise run")
        return cls(data["method"], data["granularity"], data["model"], int(data["num_layers"]),
                   list(data["shapes"]), data.get("layer"), data.get("attn"), data.get("mlp"),
                   dict(data.get("details", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LayerImportance":
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"importance_config '{p}' not found",
                            "pass the layer_importance_config.json of a layerwise/blockwise run")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"importance_config '{p}' is malformed ({exc})",
                            "pass the layer_importance_config.json of a layerwise/blockwise run") from exc

    def check_compatible(self, model: str, shapes: list[LayerShape], granularity: str) -> None:
        """Reuse only on the model (and layer count / shapes) the importance was measured on."""
        fix = "recompute it (drop importance_config) or pass the config of a run on this model"
        if self.num_layers != len(shapes):
            raise UserError(f"importance_config is for {self.num_layers} layers but the model has "
                            f"{len(shapes)}", fix)
        if _identity(self.model) != _identity(model):
            raise UserError(f"importance_config was measured on model '{self.model}', not '{model}'", fix)
        if [LayerShape(**s) for s in self.shapes] != list(shapes):
            raise UserError("importance_config was measured on a model with other layer shapes", fix)
        if not self.covers(granularity):
            raise UserError(f"importance_config holds {self.granularity} importance but "
                            f"{granularity} importance is needed",
                            "use a config from a run of the same method (layerwise: layer, "
                            "blockwise: block) or an activation config, or recompute it")


def _identity(name: str) -> str:
    """Compare local directories by resolved path, hub ids / aliases as typed."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


# ---- helpers on the walker's captured inputs ---------------------------------------------------

def _check_architecture_of(model) -> None:
    for part in ("final norm", "LM head"):
        try:
            arch.final_norm(model) if part == "final norm" else arch.lm_head(model).weight
        except (AttributeError, UserError) as exc:
            raise UserError(f"layer importance needs a Llama/Qwen2/Mistral-style backbone (no {part})",
                            "use a supported architecture") from exc


def _check_reproduces_forward(model, ids: torch.Tensor, nll_sum: float) -> None:
    """The layer-by-layer base loss must equal the model's own loss (else importances are wrong)."""
    ref = float(model(input_ids=ids, labels=ids).loss) * ids[:, 1:].numel()
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not math.isclose(nll_sum, ref, rel_tol=tol, abs_tol=tol):
        raise RuntimeError(f"layer-by-layer forward gives loss {nll_sum:.6g}, model.forward {ref:.6g}: "
                           f"{type(model).__name__} is not a Llama/Qwen2/Mistral-style forward")


# ---- the two measures -----------------------------------------------------------------------

def removal_importance(model, ids: torch.Tensor, granularity: str = "layer",
                       batch_size: int = 4) -> tuple[list | None, list | None, list | None, dict]:
    """Loss increase when each layer (granularity "layer") or block ("block") is skipped.

    ids: LongTensor [N, T]. Returns (layer [L] | None, attn [L] | None, mlp [L] | None, details).
    """
    _check_architecture_of(model)
    layers = arch.decoder_layers(model)
    n = len(layers)
    device = arch.model_device(model)
    base, skip = 0.0, {k: [0.0] * n for k in (("layer",) if granularity == "layer" else ("attn", "mlp"))}
    layer_fw = heads = 0
    with torch.no_grad():
        cap = capture(model, ids, batch_size)   # layer-0 inputs + each layer's kwargs, per chunk
        for b, (chunk, h, kw) in enumerate(tqdm(list(zip(cap.chunks, cap.hidden, cap.kwargs)),
                                                desc="layer importance (removal)", leave=False)):
            batch = chunk.to(device)
            for i in range(n):
                mid = arch.attn_half(layers[i], h, kw[i])
                out = arch.mlp_half(layers[i], mid)
                if granularity == "layer":
                    skip["layer"][i] += next_token_nll(model, run_from(model, i + 1, h, kw), batch)
                else:
                    skip["attn"][i] += next_token_nll(model, run_from(model, i + 1, arch.mlp_half(layers[i], h), kw), batch)
                    skip["mlp"][i] += next_token_nll(model, run_from(model, i + 1, mid, kw), batch)
                h = out
            nll_b = next_token_nll(model, h, batch)
            if b == 0:
                _check_reproduces_forward(model, batch, nll_b)
            base += nll_b
            layer_fw += n + len(skip) * n * (n - 1) // 2 + (n / 2 if granularity == "block" else 0)
            heads += 1 + len(skip) * n
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    base_nll = base / tokens
    imp = {k: [v / tokens - base_nll for v in vals] for k, vals in skip.items()}
    details = {"baseline_ppl": math.exp(base_nll), "tokens": tokens,
               **{f"skip_{k}_ppl": [math.exp(min(v / tokens, 700)) for v in vals] for k, vals in skip.items()},
               "cost": {"decoder_layer_forwards": layer_fw, "head_evaluations": heads,
                        "full_pass_equivalents": layer_fw / n,
                        "naive_full_passes": (2 * n if granularity == "block" else n) * -(-ids.shape[0] // batch_size),
                        "check_forwards": 1}}
    return imp.get("layer"), imp.get("attn"), imp.get("mlp"), details


def activation_importance(model, ids: torch.Tensor, batch_size: int = 4) -> tuple[list, list, list, dict]:
    """Mean (1 - cos) between a layer's (block's) input and output over tokens 1..T-1. One pass."""
    layers = arch.decoder_layers(model)
    n = len(layers)
    sums = {k: [0.0] * n for k in ("layer", "attn", "mlp")}
    count = 0

    def change(a, b):  # [B, T, H] x2 -> summed 1 - cos over positions 1..
        return float((1 - F.cosine_similarity(a[:, 1:].float(), b[:, 1:].float(), dim=-1)).sum())

    with torch.no_grad():
        cap = capture(model, ids, batch_size)
        for h, kw in tqdm(list(zip(cap.hidden, cap.kwargs)), desc="layer importance (activation)", leave=False):
            for i in range(n):
                mid = arch.attn_half(layers[i], h, kw[i])
                out = arch.mlp_half(layers[i], mid)
                sums["layer"][i] += change(h, out)
                sums["attn"][i] += change(h, mid)
                sums["mlp"][i] += change(mid, out)
                h = out
            count += h.shape[0] * (h.shape[1] - 1)
    vals = {k: [v / count for v in s] for k, s in sums.items()}
    return vals["layer"], vals["attn"], vals["mlp"], {"tokens": count,
                                                      "cost": {"decoder_layer_forwards": n * -(-ids.shape[0] // batch_size)}}


def compute_layer_importance(model, ids: torch.Tensor, method: str = "removal",
                             granularity: str = "layer", batch_size: int = 4,
                             model_name: str = "", extra: dict | None = None) -> LayerImportance:
    """Measure importance with ``method`` over ids [N, T] (see the module docstring)."""
    measure = IMPORTANCE_METHODS.get(method)
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown importance granularity '{granularity}'", f"use one of {GRANULARITIES}")
    layer, attn, mlp, details, gran = measure(model, ids, granularity, batch_size)
    details = {"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), **details, **(extra or {})}
    shapes = model_shapes(model)
    return LayerImportance(method, gran, model_name, len(shapes), [s.to_dict() for s in shapes],
                           layer, attn, mlp, details)


IMPORTANCE_METHODS.register("removal", lambda model, ids, granularity, batch_size:
                            (*removal_importance(model, ids, granularity, batch_size), granularity))
IMPORTANCE_METHODS.register("activation", lambda model, ids, granularity, batch_size:
                            (*activation_importance(model, ids, batch_size), "both"))  # one pass gives both
