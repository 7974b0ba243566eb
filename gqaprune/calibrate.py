"""The one layer walker: each decoder layer's calibration inputs, once, in order.

Every method that works layer by layer (layer importance, least-squares reconstruction,
reconstruction-aware selection, Wanda / SparseGPT) needs the hidden states entering layer l
*of the model as modified so far* (layers < l already pruned or refit), plus the forward kwargs
the model passes that layer (masks, rotary embeddings, sliding windows per layer type). The
walker gets them from the model's own forward — hooks capture what transformers passes, nothing
of its internals is replayed — and then advances the calibration set one layer at a time:

    for step in LayerWalker(model, ids, batch_size):      # ids: LongTensor [N, T]
        step.inputs      # list over chunks of [b, T, H]: hidden states entering step.layer
        step.kwargs      # list over chunks: the layer's forward kwargs
        ... modify step.layer in place (cut, refit, mask) ...
        # optional: step.outputs = [...] when the consumer already computed them
    # after each step the walker runs the (modified) layer on step.inputs to get the next inputs

Memory: one layer's inputs for the whole calibration set (N x T x H in the model dtype; twice
with ``dense="stream"``), plus one copy of the current layer with ``dense`` != "none". Never a
second model, never every layer's activations.

``dense``:
* ``"none"``   – only the walked (modified) model;
* ``"layer"``  – also ``step.dense_layer``: a copy of layer l taken before the consumer changes it;
* ``"stream"`` – also ``step.dense_inputs``: the *dense* model's hidden states entering layer l,
  advanced with the dense copies (reconstruction targets).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from gqaprune import arch
from gqaprune.errors import UserError

DENSE_MODES = ("none", "layer", "stream")


class StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class Captured:
    """Layer-0 inputs per chunk and every layer's forward kwargs per chunk."""
    chunks: list[torch.Tensor]            # token ids [b, T] per chunk
    hidden: list[torch.Tensor]            # [b, T, H] per chunk, entering layer 0
    kwargs: list[list[dict]]              # kwargs[c][l]: layer l's forward kwargs for chunk c

    def layer_kwargs(self, layer: int) -> list[dict]:
        return [k[layer] for k in self.kwargs]


@torch.no_grad()
def capture(model, ids: torch.Tensor, batch_size: int) -> Captured:
    """Run the model's own forward on ``ids`` [N, T] in chunks of ``batch_size`` and record the
    hidden state entering layer 0 and each layer's kwargs.

    The kwargs depend only on a chunk's shape, so the full forward (up to the last layer's input)
    runs once per distinct shape; other chunks stop at layer 0.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}", "pass a positive batch_size")
    layers = arch.decoder_layers(model)
    device = arch.model_device(model)
    chunks = list(ids.split(batch_size))
    per_shape: dict[tuple, list[dict]] = {}
    hidden, kwargs = [], []
    state: dict = {}

    def hook(idx):
        def pre(_mod, args, kw):
            if idx == 0:
                state["h"] = args[0] if args else kw["hidden_states"]
                if state["shape"] in per_shape:
                    raise StopForward
            state.setdefault("kw", []).append({k: v for k, v in kw.items() if k != "hidden_states"})
            if idx == len(layers) - 1:
                raise StopForward
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for chunk in chunks:
            state.clear()
            state["shape"] = tuple(chunk.shape)
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except StopForward:
                pass
            per_shape.setdefault(state["shape"], state.get("kw"))
            hidden.append(state["h"].detach())
            kwargs.append(per_shape[state["shape"]])
    finally:
        for h in handles:
            h.remove()
    return Captured(chunks, hidden, kwargs)


@dataclass
class LayerStep:
    """One decoder layer with the calibration set's inputs (see the module docstring)."""
    index: int
    layer: torch.nn.Module
    inputs: list[torch.Tensor]
    kwargs: list[dict]
    dense_layer: torch.nn.Module | None = None
    dense_inputs: list[torch.Tensor] | None = None
    outputs: list[torch.Tensor] | None = None          # set by a consumer that computed them
    dense_outputs: list[torch.Tensor] | None = None
    info: dict = field(default_factory=dict)            # free space for the consumer

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.inputs)


class LayerWalker:
    """Iterate the decoder layers of ``model`` with calibration inputs ``ids`` [N, T]."""

    def __init__(self, model, ids: torch.Tensor, batch_size: int, *, dense: str = "none",
                 progress: bool = True, desc: str = "calibrate"):
        if dense not in DENSE_MODES:
            raise ValueError(f"dense must be one of {DENSE_MODES}, got {dense!r}")
        self.model, self.ids, self.batch_size = model, ids, batch_size
        self.dense, self.progress, self.desc = dense, progress, desc
        self.captured: Captured | None = None

    def __len__(self) -> int:
        return len(arch.decoder_layers(self.model))

    @torch.no_grad()
    def __iter__(self):
        layers = arch.decoder_layers(self.model)
        self.captured = cap = capture(self.model, self.ids, self.batch_size)
        hidden = list(cap.hidden)
        dense = list(cap.hidden) if self.dense == "stream" else None
        bar = tqdm(total=len(layers), desc=self.desc, leave=False, disable=not self.progress)
        try:
            for i, layer in enumerate(layers):
                kw = cap.layer_kwargs(i)
                step = LayerStep(i, layer, hidden, kw,
                                 copy.deepcopy(layer) if self.dense != "none" else None, dense)
                yield step
                hidden = step.outputs if step.outputs is not None else \
                    [arch.run_layer(layer, h, k) for h, k in zip(hidden, kw)]
                if dense is not None:
                    dense = step.dense_outputs if step.dense_outputs is not None else \
                        [arch.run_layer(step.dense_layer, h, k) for h, k in zip(dense, kw)]
                step.dense_layer = step.inputs = step.dense_inputs = None  # free before the next layer
                bar.update(1)
        finally:
            bar.close()


@torch.no_grad()
def run_from(model, start: int, h: torch.Tensor, kwargs: list[dict]) -> torch.Tensor:
    """Layers ``start..L-1`` on h [B, T, H]; ``kwargs[l]``: layer l's kwargs for this chunk."""
    layers = arch.decoder_layers(model)
    for i in range(start, len(layers)):
        h = arch.run_layer(layers[i], h, kwargs[i])
    return h


@torch.no_grad()
def next_token_nll(model, h: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL over ids[:, 1:] given the last decoder layer's output h [B, T, H]."""
    logits = arch.lm_head(model)(arch.final_norm(model)(h))[:, :-1]      # [B, T-1, V]
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                   reduction="sum"))
