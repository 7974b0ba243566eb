"""The demo model's corpus: the running Python's own ``pydoc_data.topics`` (offline, always there).

Floor 2 (data): the text sources registry (``data.py``) serves it as the ``demo`` source, and
``demo.py`` trains the demo model on it.
"""
from __future__ import annotations

import hashlib

from gqaprune.errors import UserError

HOLDOUT_EVERY = 20            # every 20th topic (by sorted name) is held out: ~5% of topics


def demo_texts(split: str) -> list[str]:
    """The pydoc topic texts of one split: ``"train"`` (~95%) or ``"validation"`` (~5%).

    Topics are sorted by name; every ``HOLDOUT_EVERY``-th one (positions 0, 20, 40, ...)
    is held out, which spreads the held-out pages over the whole reference.
    """
    from pydoc_data.topics import topics

    if split not in ("train", "validation"):
        raise UserError(f"unknown demo split '{split}'", "use 'train' or 'validation'")
    held_out = split == "validation"
    return [topics[name] for i, name in enumerate(sorted(topics))
            if (i % HOLDOUT_EVERY == 0) == held_out]


def corpus_sha256() -> str:
    text = "\x00".join(demo_texts("train") + ["\x01"] + demo_texts("validation"))
    return hashlib.sha256(text.encode()).hexdigest()
