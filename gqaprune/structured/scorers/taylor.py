"""``taylor``: first- or second-order Taylor importance of each unit over calibration windows.

Element salience (estimated loss change when the weight is zeroed), g = dL/dw summed over
calibration mini-batches:
  order 1:  s = w * g
  order 2:  s = -w * g + 0.5 * w**2 * F,   F = sum_b g_b**2 (diagonal Fisher)
A unit's score: vector variant sum_t |sum_unit s| (per tensor t: sum, then abs); element variant
sum_t sum_unit |s|.

Memory (``taylor_scores``, see :class:`TaylorSums`): each mini-batch gradient g_b is folded into
the sums the scores need by a post-accumulate-grad hook the moment autograd produces it, and
``p.grad`` is freed, so mini-batch gradients of all layers never coexist with the sums. Held for
the whole pass, per prunable parameter p (P = p.shape): G = sum_b g_b (P, p.dtype; every score
and the gradient diagnosis need it); order 2 adds the Fisher part: vector variant only per-unit
sums (float32 [n_kv] / [I] per tensor), element variant F = sum_b g_b**2 (P, float32: |s| per
element needs it). :func:`accumulate_gradients` is the full-gradient reference (it also holds
every p.grad during backward: G, F and all g_b at once), kept for tests and benchmarks.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from gqaprune.arch import decoder_layers, layer_parameters, prunable_parameters
from gqaprune.config import Section, knob
from gqaprune.structured.scoring import SCORERS, GradStat, Scorer, UnitScores, reduce_units
from gqaprune.structured.units import model_shapes, unit_views

TAYLOR_VARIANTS = ("vector", "element")


@dataclass(frozen=True)
class TaylorConfig(Section):
    """Taylor importance (scorer taylor)"""
    taylor_variant: str = knob("vector", "vector: |sum(w*g)| per tensor; element: sum|w*g|",
                               choices=TAYLOR_VARIANTS)
    taylor_order: int = knob(1, "1: w*g; 2: adds the diagonal-Fisher term 0.5*w^2*sum(g_b^2)",
                             choices=(1, 2))


@contextmanager
def _projection_grads(model):
    """Only the projection weights require grad (embeddings / lm_head cost no gradient memory),
    their .grad starts empty, the model is in eval mode; everything is restored on exit. Yields
    the prunable parameters."""
    params = list(prunable_parameters(model))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.eval()
    try:
        yield params
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def accumulate_gradients(model, batches: torch.Tensor, batch_size: int, second_order: bool,
                         desc: str = "taylor") -> tuple[dict, dict]:
    """Reference full-gradient path (tests, benchmarks): causal-LM loss gradients of the prunable
    parameters, summed over mini-batches. :func:`taylor_scores` uses :func:`stream_taylor`.

    batches: LongTensor [N, T]. Returns ({param: sum_b g_b}, {param: sum_b g_b**2} or {}).
    Only the projection weights require grad, so embeddings/lm_head cost no gradient memory.
    """
    grad_sum: dict = {}
    grad_sq: dict = {}
    with _projection_grads(model) as params:
        device = next(model.parameters()).device
        for start in tqdm(range(0, batches.shape[0], batch_size), desc=desc, leave=False):
            ids = batches[start: start + batch_size].to(device)
            model(input_ids=ids, labels=ids).loss.backward()
            if second_order:
                # The Fisher diagonal needs each mini-batch gradient g_b, so sum by hand.
                for p in params:
                    g, p.grad = p.grad, None
                    grad_sum[p] = g if p not in grad_sum else grad_sum[p] + g
                    grad_sq[p] = g.float().pow(2) + grad_sq.get(p, 0)
        if not second_order:  # .grad already holds sum_b g_b
            grad_sum = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    return grad_sum, grad_sq


def gradient_stats(model, grads: dict) -> list[GradStat]:
    """Per-layer gradient norm and mean |g| over the layer's projection weights."""
    out = []
    for layer in decoder_layers(model):
        gs = [grads[p].float() for p in layer_parameters(layer)]
        n = sum(g.numel() for g in gs)
        out.append(GradStat(float(torch.sqrt(sum(g.pow(2).sum() for g in gs))),
                            float(sum(g.abs().sum() for g in gs) / n)))
    return out


def taylor_from_grads(model, grads: dict, grad_sq: dict, variant: str, order: int) -> UnitScores:
    """Aggregate element saliences per unit (module docstring)."""
    TaylorConfig(variant, order)   # validates both

    def salience(p):
        w, g = p.detach().float(), grads[p].float()
        if order == 1:
            return w * g
        return -w * g + 0.5 * w.pow(2) * grad_sq[p]

    attn, mlp = [], []
    for layer, shape in zip(decoder_layers(model), model_shapes(model)):
        a, m = unit_views(layer, shape, salience)
        attn.append(reduce_units(a, variant))
        mlp.append(reduce_units(m, variant))
    return UnitScores(attn, mlp, power=1.0, gradient_stats=gradient_stats(model, grads))


@dataclass
class TaylorSums:
    """What the streamed pass holds after the calibration windows (P = a prunable parameter's shape).

    grad:   {p: sum_b g_b}, P, p.dtype (== what ``p.grad`` accumulates in a plain backward loop)
    fisher: element order 2 only: {p: sum_b g_b**2}, P, float32
    unit_fisher: vector order 2 only: per layer (attn, mlp), lists aligned with
            :func:`~gqaprune.structured.units.unit_views`: attn [n_kv] per tensor, mlp [I] per
            tensor, float32 sums over the unit's elements of 0.5 * w**2 * sum_b g_b**2
    """
    grad: dict
    fisher: dict = field(default_factory=dict)
    unit_fisher: list | None = None


class _Fold:
    """Post-accumulate-grad hook: fold one mini-batch gradient g_b of parameter p into the sums
    and free ``p.grad``. Vector order 2 keeps the current layer's g_b until all its parameters
    arrived, then reduces 0.5 * w**2 * g_b**2 per unit (one layer's gradients at a time)."""

    def __init__(self, model, variant: str, order: int):
        self.sums = TaylorSums({})
        self.vector2 = order == 2 and variant == "vector"
        self.element2 = order == 2 and variant == "element"
        self.layers = decoder_layers(model)
        self.shapes = model_shapes(model)
        self.owner = {p: i for i, layer in enumerate(self.layers) for p in layer_parameters(layer)}
        self.count = [len(list(layer_parameters(layer))) for layer in self.layers]
        self.pending: dict[int, dict] = {}
        if self.vector2:
            self.sums.unit_fisher = [None] * len(self.layers)

    def __call__(self, p: torch.Tensor) -> None:
        g, p.grad = p.grad, None
        s = self.sums
        s.grad[p] = g if p not in s.grad else s.grad[p].add_(g)
        if self.element2:
            sq = g.float().pow(2)
            s.fisher[p] = sq if p not in s.fisher else s.fisher[p].add_(sq)
        elif self.vector2:
            i = self.owner[p]
            got = self.pending.setdefault(i, {})
            # g is G itself on the first batch; G is not changed again before this layer's flush
            got[p] = g
            if len(got) == self.count[i]:
                self.flush(i)

    def flush(self, i: int) -> None:
        """Add layer i's 0.5 * sum_unit w**2 g_b**2 per tensor (missing gradients count as 0)."""
        got = self.pending.pop(i, {})

        def fisher(q):
            g = got.get(q)
            w2 = q.detach().float().pow(2)
            return 0.5 * w2 * g.float().pow(2) if g is not None else torch.zeros_like(w2)

        a, m = unit_views(self.layers[i], self.shapes[i], fisher)
        parts = ([x.reshape(x.shape[0], -1).sum(1) for x in a], [x.reshape(x.shape[0], -1).sum(1) for x in m])
        old = self.sums.unit_fisher[i]
        self.sums.unit_fisher[i] = parts if old is None else tuple(
            [o + n for o, n in zip(olds, news)] for olds, news in zip(old, parts))

    def finish_batch(self) -> None:
        for i in list(self.pending):
            self.flush(i)


def stream_taylor(model, batches: torch.Tensor, batch_size: int, variant: str, order: int,
                  desc: str = "taylor") -> TaylorSums:
    """One calibration pass (batches LongTensor [N, T]) folding each mini-batch gradient into
    :class:`TaylorSums` by gradient hooks. Only projection weights require grad."""
    fold = _Fold(model, variant, order)
    with _projection_grads(model) as params:
        handles = [p.register_post_accumulate_grad_hook(fold) for p in params]
        device = next(model.parameters()).device
        try:
            for start in tqdm(range(0, batches.shape[0], batch_size), desc=desc, leave=False):
                ids = batches[start: start + batch_size].to(device)
                model(input_ids=ids, labels=ids).loss.backward()
                fold.finish_batch()
        finally:
            for h in handles:
                h.remove()
            for p in model.parameters():
                p.grad = None
    return fold.sums


def _vector2_scores(model, sums: TaylorSums) -> UnitScores:
    """Vector order 2: sum_t |sum_unit(-w*G) + 0.5 sum_unit w^2 F| from the per-unit Fisher sums."""
    def first(p):
        return -p.detach().float() * sums.grad[p].float()

    attn, mlp = [], []
    for layer, shape, fisher in zip(decoder_layers(model), model_shapes(model), sums.unit_fisher):
        for views, fs, out in zip(unit_views(layer, shape, first), fisher, (attn, mlp)):
            total = sum((v.reshape(v.shape[0], -1).sum(1) + f).abs() for v, f in zip(views, fs))
            out.append(total.cpu())
    return UnitScores(attn, mlp, power=1.0, gradient_stats=gradient_stats(model, sums.grad))


def scores_from_sums(model, sums: TaylorSums, variant: str, order: int) -> UnitScores:
    """Unit scores from the streamed sums (equal to :func:`taylor_from_grads` on full gradients)."""
    if order == 2 and variant == "vector":
        return _vector2_scores(model, sums)
    return taylor_from_grads(model, sums.grad, sums.fisher, variant, order)


def taylor_scores(model, batches: torch.Tensor, section: TaylorConfig | None = None, *,
                  batch_size: int = 4, seed: int = 0) -> UnitScores:
    """First/second-order Taylor importance over calibration batches [N, T]."""
    section = section or TaylorConfig()
    sums = stream_taylor(model, batches, batch_size, section.taylor_variant, section.taylor_order)
    return scores_from_sums(model, sums, section.taylor_variant, section.taylor_order)


SCORERS.register("taylor", Scorer(taylor_scores, needs_calibration=True, section="taylor",
                                  summary="first/second-order Taylor |w*dL/dw| over calibration windows"))
