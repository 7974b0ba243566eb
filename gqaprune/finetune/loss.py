"""The training objective: mean next-token NLL over the target tokens of an optimizer step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gqaprune.finetune.encoding import IGNORE, Encoded, collate


def nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens and their count (position t predicts t+1)."""
    device = next(p for p in model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device))
    logits = out.logits[:, :-1].float()                       # [B, L-1, V]
    targets = batch["labels"][:, 1:].to(device)               # [B, L-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def mean_loss(model: nn.Module, examples: list[Encoded], batch_size: int, pad_id: int) -> float:
    """Mean target-token NLL over ``examples`` (eval mode; restores the previous mode)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        s, n = nll_sum(model, collate(examples[i:i + batch_size], pad_id))
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def accumulate_gradients(model: nn.Module, batches: list[dict], n_tokens: int, scaler=None) -> float:
    """Backward of sum(NLL) / n_tokens over micro-batches: the gradient of the mean target NLL of
    the whole optimizer step, whatever the split into micro-batches. Returns the summed NLL."""
    total = 0.0
    for batch in batches:
        loss_sum, _ = nll_sum(model, batch)
        loss = loss_sum / max(n_tokens, 1)
        (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss_sum.detach())
    return total
