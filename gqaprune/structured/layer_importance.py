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

Cost of ``removal`` (why it meets "one forward pass per layer"): the embeddings and decoder layers
are run by hand, once, and the hidden state entering layer l is reused for the branch that skips
l: the branch runs only layers l+1..L-1 plus the final norm and LM head. Per mini-batch:

* layer granularity: L (base pass) + sum_l (L-1-l) = L(L+1)/2 decoder-layer forwards and L+1 head
  evaluations, i.e. (L+1)/2 full forward passes for L layers (naive re-running: L passes).
* block granularity: L + L/2 (the attention-skip branch's own MLP) + 2 * L(L-1)/2 = L^2 + L/2
  decoder-layer forwards and 2L+1 head evaluations, i.e. under one full pass per block (2L blocks).

Plus one check: on the first mini-batch the hand-run loss is compared with ``model(...).loss``
(one extra forward), so an architecture whose forward differs is caught instead of silently
producing wrong importances. Only one hidden state per branch is alive at a time (memory
O(batch * T * hidden), not O(L * ...)).

Rotary embeddings and the causal mask are built exactly as ``LlamaModel`` / ``Qwen2Model`` /
``MistralModel.forward`` do in transformers 5: ``rotary_emb(h, position_ids)``,
``create_causal_mask`` per layer type and ``create_sliding_window_causal_mask`` for sliding layers
(Qwen2 ``layer_types``) or a Mistral ``sliding_window``.
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
from gqaprune.models import decoder_layers
from gqaprune.structured.units import LayerShape, model_shapes

IMPORTANCE_METHODS = ("removal", "activation")
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


# ---- running the backbone by hand ------------------------------------------------------------

class Backbone:
    """Embeddings, masks, rotary embeddings and the two residual halves of each decoder layer.

    Mirrors ``LlamaModel.forward`` (same for Qwen2/Mistral) with no cache and no padding mask:
    layer(h) = mlp_half(attn_half(h)), attn_half(h) = h + attn(input_norm(h)),
    mlp_half(h) = h + mlp(post_attention_norm(h)).
    """

    def __init__(self, model):
        self.model = model
        self.layers = decoder_layers(model)
        self.inner = _inner(model)
        self.config = self.inner.config
        self.head = model.get_output_embeddings()

    def embed(self, ids: torch.Tensor):
        """ids [B, T] -> (h [B, T, H], ctx = (per-layer masks, position_ids [1, T], (cos, sin)))."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
        h = self.inner.embed_tokens(ids)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        kw = dict(config=self.config, inputs_embeds=h, attention_mask=None, past_key_values=None,
                  position_ids=pos)
        types = self._layer_types()
        built = {t: (create_sliding_window_causal_mask(**kw) if t == "sliding_attention"
                     else create_causal_mask(**kw)) for t in set(types)}
        pe = self.inner.rotary_emb(h, position_ids=pos)
        return h, ([built[t] for t in types], pos, pe)

    def _layer_types(self) -> list[str]:
        n = len(self.layers)
        types = getattr(self.config, "layer_types", None)
        if types is not None:
            return list(types)[:n]
        sliding = getattr(self.config, "sliding_window", None) is not None  # Mistral
        return ["sliding_attention" if sliding else "full_attention"] * n

    def attn_half(self, i: int, h: torch.Tensor, ctx) -> torch.Tensor:
        masks, pos, pe = ctx
        layer = self.layers[i]
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=masks[i],
                                 position_ids=pos, past_key_values=None, position_embeddings=pe)
        return h + out

    def mlp_half(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def run_from(self, start: int, h: torch.Tensor, ctx) -> torch.Tensor:
        for i in range(start, len(self.layers)):
            h = self.mlp_half(i, self.attn_half(i, h, ctx))
        return h

    def nll(self, h: torch.Tensor, ids: torch.Tensor) -> float:
        """Summed next-token NLL over ids[:, 1:] given the last hidden state h [B, T, H]."""
        logits = self.head(self.inner.norm(h))[:, :-1]          # [B, T-1, V]
        return float(F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                     reduction="sum"))


def _inner(model):
    inner = model
    for attr in ("base_model", "model"):
        while hasattr(inner, attr) and not hasattr(inner, "layers"):
            inner = getattr(inner, attr)
    for name in ("embed_tokens", "norm", "rotary_emb", "layers"):
        if not hasattr(inner, name):
            raise UserError(f"layer importance needs a Llama/Qwen2/Mistral-style backbone (no '{name}')",
                            "use a supported architecture")
    return inner


def _check_reproduces_forward(model, bb: Backbone, ids: torch.Tensor, nll_sum: float) -> None:
    """The hand-run base loss must equal the model's own loss (else importances are wrong)."""
    ref = float(model(input_ids=ids, labels=ids).loss) * ids[:, 1:].numel()
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not math.isclose(nll_sum, ref, rel_tol=tol, abs_tol=tol):
        raise RuntimeError(f"hand-run forward gives loss {nll_sum:.6g}, model.forward {ref:.6g}: "
                           f"{type(model).__name__} is not a Llama/Qwen2/Mistral-style forward")


# ---- the two measures -----------------------------------------------------------------------

def removal_importance(model, ids: torch.Tensor, granularity: str = "layer",
                       batch_size: int = 4) -> tuple[list | None, list | None, list | None, dict]:
    """Loss increase when each layer (granularity "layer") or block ("block") is skipped.

    ids: LongTensor [N, T]. Returns (layer [L] | None, attn [L] | None, mlp [L] | None, details).
    """
    bb = Backbone(model)
    n = len(bb.layers)
    device = next(model.parameters()).device
    base, skip = 0.0, {k: [0.0] * n for k in (("layer",) if granularity == "layer" else ("attn", "mlp"))}
    layer_fw = heads = 0
    with torch.no_grad():
        for b, start in enumerate(tqdm(range(0, ids.shape[0], batch_size), desc="layer importance (removal)",
                                       leave=False)):
            batch = ids[start: start + batch_size].to(device)
            h, ctx = bb.embed(batch)
            for i in range(n):
                mid = bb.attn_half(i, h, ctx)
                out = bb.mlp_half(i, mid)
                if granularity == "layer":
                    skip["layer"][i] += bb.nll(bb.run_from(i + 1, h, ctx), batch)
                else:
                    skip["attn"][i] += bb.nll(bb.run_from(i + 1, bb.mlp_half(i, h), ctx), batch)
                    skip["mlp"][i] += bb.nll(bb.run_from(i + 1, mid, ctx), batch)
                h = out
            nll_b = bb.nll(h, batch)
            if b == 0:
                _check_reproduces_forward(model, bb, batch, nll_b)
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
    bb = Backbone(model)
    n = len(bb.layers)
    device = next(model.parameters()).device
    sums = {k: [0.0] * n for k in ("layer", "attn", "mlp")}
    count = 0

    def change(a, b):  # [B, T, H] x2 -> summed 1 - cos over positions 1..
        return float((1 - F.cosine_similarity(a[:, 1:].float(), b[:, 1:].float(), dim=-1)).sum())

    with torch.no_grad():
        for start in tqdm(range(0, ids.shape[0], batch_size), desc="layer importance (activation)",
                          leave=False):
            batch = ids[start: start + batch_size].to(device)
            h, ctx = bb.embed(batch)
            for i in range(n):
                mid = bb.attn_half(i, h, ctx)
                out = bb.mlp_half(i, mid)
                sums["layer"][i] += change(h, out)
                sums["attn"][i] += change(h, mid)
                sums["mlp"][i] += change(mid, out)
                h = out
            count += batch.shape[0] * (batch.shape[1] - 1)
    vals = {k: [v / count for v in s] for k, s in sums.items()}
    return vals["layer"], vals["attn"], vals["mlp"], {"tokens": count,
                                                      "cost": {"decoder_layer_forwards": n * -(-ids.shape[0] // batch_size)}}


def compute_layer_importance(model, ids: torch.Tensor, method: str = "removal",
                             granularity: str = "layer", batch_size: int = 4,
                             model_name: str = "", extra: dict | None = None) -> LayerImportance:
    """Measure importance with ``method`` over ids [N, T] (see the module docstring)."""
    check_method(method)
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown importance granularity '{granularity}'", f"use one of {GRANULARITIES}")
    if method == "removal":
        layer, attn, mlp, details = removal_importance(model, ids, granularity, batch_size)
        gran = granularity
    else:
        layer, attn, mlp, details = activation_importance(model, ids, batch_size)
        gran = "both"
    details = {"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), **details, **(extra or {})}
    shapes = model_shapes(model)
    return LayerImportance(method, gran, model_name, len(shapes), [s.to_dict() for s in shapes],
                           layer, attn, mlp, details)


def check_method(method: str) -> None:
    if method not in IMPORTANCE_METHODS:
        raise UserError(f"unknown importance_method '{method}'", f"use one of {', '.join(IMPORTANCE_METHODS)}")
