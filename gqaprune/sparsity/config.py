"""Typed settings of the sparsity methods (``SparsityConfig``) and their validation.

Every field carries ``metadata={"help": ..., "choices": ...}`` so command-line flags can be
generated from the dataclass. ``validate(model)`` raises :class:`UserError` (problem; fix) for bad
values; with a model it also checks the pattern / block size against every projection's shape.

Which sparsity a run targets (``target_sparsity``):
* ``unstructured`` (wanda, sparsegpt, magnitude_unstructured): ``sparsity`` itself (required);
* ``N:M``: fixed by the pattern, 1 - N/M (``sparsity`` may be omitted or must equal it);
* ``block_hybrid``: fixed by the tiers, f_nm * (1 - N/M) + f_removed (same rule for ``sparsity``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from gqaprune import arch
from gqaprune.config import Section, knob
from gqaprune.errors import UserError

METHODS = ("wanda", "sparsegpt", "magnitude_unstructured", "block_hybrid")
CALIBRATED_METHODS = ("wanda", "sparsegpt", "block_hybrid")   # need calibration activations
HESSIAN_DTYPES = ("float32", "float64")
SELECTIONS = ("block", "row")
UNSTRUCTURED = "unstructured"
TIER_NAMES = ("dense", "nm", "removed")
SUM_TOLERANCE = 1e-6
SPARSE_FORMATS = ("dense", "compressed")
DEFAULT_DAMPING = 0.01      # sparsegpt: relative to the mean Hessian diagonal, as in the paper


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M."""
    if pattern == UNSTRUCTURED:
        return None
    parts = str(pattern).split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"sparsity_pattern '{pattern}' is neither 'unstructured' nor N:M",
                        "pass sparsity_pattern=unstructured or e.g. 2:4 / 4:8") from None
    if not 0 < n < m:
        raise UserError(f"sparsity_pattern {pattern} needs 0 < N < M (N non-zeros kept in every M)",
                        "pass e.g. 2:4 or 4:8")
    return n, m


def parse_fractions(value) -> tuple[float, float, float]:
    """``"0.35,0.45,0.2"`` or a sequence -> (dense, nm, removed) floats."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"tier_fractions {value!r} are not numbers",
                        "pass three fractions dense,nm,removed, e.g. 0.35,0.45,0.2") from None
    if len(out) != 3:
        raise UserError(f"tier_fractions needs 3 values (dense, N:M, removed), got {len(out)}",
                        "pass e.g. 0.35,0.45,0.2")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class SparsityConfig:
    method: str = field(default="wanda", metadata={
        "help": "sparsity method: wanda (|W|*||X||_2 per output row), sparsegpt (second-order, "
                "inverse-Hessian weight updates), magnitude_unstructured (|W| per row, no "
                "calibration), block_hybrid (BxB tiles ranked by summed Wanda score: dense / N:M / removed)",
        "choices": METHODS})
    sparsity: float | None = field(default=None, metadata={
        "help": "fraction of the projection weights of the decoder layers set to zero, in [0, 1); "
                "required for the unstructured pattern; none = implied by an N:M pattern (1 - N/M) "
                "or by block_hybrid's tiers (given anyway, it must equal the implied value)"})
    sparsity_pattern: str = field(default=UNSTRUCTURED, metadata={
        "help": "unstructured, or N:M = N non-zeros kept in every M consecutive input weights of "
                "a row (any 0 < N < M, e.g. 2:4, 4:8; M must divide every input dimension); "
                "block_hybrid: the pattern inside its middle tier's tiles"})
    block_size: int = field(default=16, metadata={
        "help": "block_hybrid: tile side B (tiles are BxB; B must divide every projection's rows "
                "and columns, and M must divide B)"})
    tier_fractions: tuple[float, float, float] = field(default=(0.35, 0.45, 0.2), metadata={
        "help": "block_hybrid: fractions of each matrix's tiles kept dense, made N:M inside, and "
                "removed (highest summed Wanda score first; must be >= 0 and sum to 1), e.g. 0.35,0.45,0.2"})
    owl: bool = field(default=False, metadata={
        "help": "OWL: non-uniform layer sparsity from activation outliers (layers with more "
                "outliers keep more weights; parameter-weighted mean = the target); unstructured only"})
    owl_lambda: float = field(default=0.08, metadata={
        "help": "OWL: span of the layer rates (rates spread over 2*lambda around the target, as "
                "in the OWL reference code)"})
    owl_m: float = field(default=5.0, metadata={
        "help": "OWL: a score |W|*||X|| is an outlier when above owl_m x its layer's mean score"})
    sparsegpt_blocksize: int = field(default=128, metadata={
        "help": "sparsegpt: columns per lazy-update block (mask chosen per block; with N:M, M "
                "must divide it)"})
    sparsegpt_selection: str = field(default="block", metadata={
        "help": "sparsegpt, unstructured: where the mask is chosen — block (the paper's adaptive "
                "selection over each block of all rows: exact count per matrix, uneven rows) or "
                "row (per output row as Wanda: exact count per row)",
        "choices": SELECTIONS})
    damping: float = field(default=0.01, metadata={
        "help": "sparsegpt: damping added to the Hessian diagonal, relative to its mean "
                "(raised x10 automatically while the Cholesky factorisation fails)"})
    hessian_dtype: str = field(default="float32", metadata={
        "help": "sparsegpt: dtype of the accumulated Hessian X^T X and of the row updates",
        "choices": HESSIAN_DTYPES})

    def __post_init__(self):
        # Command-line / grid values arrive as strings; keep the dataclass typed.
        object.__setattr__(self, "tier_fractions", parse_fractions(self.tier_fractions))

    # ---- derived -----------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.sparsity_pattern)

    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED_METHODS or self.owl

    def implied_sparsity(self) -> float | None:
        """The sparsity the pattern / tiers fix, or None for the unstructured pattern."""
        nm = self.nm
        if self.method == "block_hybrid":
            _, f_nm, f_removed = self.tier_fractions
            return f_nm * (1 - nm[0] / nm[1]) + f_removed if nm else None
        return 1 - nm[0] / nm[1] if nm else None

    def target_sparsity(self) -> float:
        self.validate()
        implied = self.implied_sparsity()
        return implied if implied is not None else float(self.sparsity)

    # ---- validation --------------------------------------------------------------------------
    def validate(self, model=None) -> None:
        """Raise UserError naming the fix; with ``model`` also check shapes against it."""
        if self.method not in METHODS:
            raise UserError(f"unknown sparsity method '{self.method}'", f"use one of {', '.join(METHODS)}")
        nm = self.nm
        self._check_positive_ints()
        if self.method == "block_hybrid":
            self._check_block_hybrid(nm)
        self._check_sparsity(nm)
        if self.owl:
            self._check_owl(nm)
        if self.method == "sparsegpt":
            self._check_sparsegpt(nm)
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise UserError(f"hessian_dtype '{self.hessian_dtype}' is not supported",
                            f"use one of {', '.join(HESSIAN_DTYPES)}")
        if model is not None:
            self.check_model(model)

    def _check_sparsity(self, nm) -> None:
        s = self.sparsity
        if s is not None and not (isinstance(s, (int, float)) and math.isfinite(s) and 0 <= s < 1):
            raise UserError(f"sparsity {s} is outside [0, 1)", "pass e.g. sparsity=0.5")
        implied = self.implied_sparsity()
        if implied is None and s is None:
            raise UserError(f"{self.method} with the unstructured pattern needs a target sparsity",
                            "pass e.g. sparsity=0.5")
        if implied is not None and s is not None and abs(s - implied) > SUM_TOLERANCE:
            what = "the tiers" if self.method == "block_hybrid" else f"the {self.sparsity_pattern} pattern"
            raise UserError(f"sparsity {s} contradicts {what}, which fix it at {implied:.6g}",
                            f"omit sparsity (none) or pass sparsity={implied:.6g}")

    def _check_positive_ints(self) -> None:
        for name in ("block_size", "sparsegpt_blocksize"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}", f"pass e.g. {name}=16")

    def _check_block_hybrid(self, nm) -> None:
        if nm is None:
            raise UserError("block_hybrid needs an N:M pattern for its middle tier",
                            "pass e.g. sparsity_pattern=2:4")
        fr = self.tier_fractions
        if any(not math.isfinite(f) or f < 0 for f in fr):
            raise UserError(f"tier_fractions {fr} include a negative or non-finite value",
                            "pass three fractions >= 0 summing to 1, e.g. 0.35,0.45,0.2")
        if abs(sum(fr) - 1) > SUM_TOLERANCE:
            raise UserError(f"tier_fractions {fr} sum to {sum(fr):.6g}, not 1",
                            "pass dense,nm,removed fractions that sum to 1, e.g. 0.35,0.45,0.2")
        if self.block_size % nm[1]:
            raise UserError(f"block_size {self.block_size} is not a multiple of M={nm[1]} of "
                            f"{self.sparsity_pattern}", f"pass a block_size that is a multiple of {nm[1]}")

    def _check_owl(self, nm) -> None:
        if nm is not None or self.method == "block_hybrid":
            raise UserError(f"owl works with the unstructured pattern of wanda / sparsegpt / "
                            f"magnitude_unstructured, not {self.method} {self.sparsity_pattern}",
                            "pass owl=false or sparsity_pattern=unstructured")
        if not (math.isfinite(self.owl_lambda) and self.owl_lambda >= 0):
            raise UserError(f"owl_lambda must be >= 0, got {self.owl_lambda}", "pass e.g. owl_lambda=0.08")
        if not (math.isfinite(self.owl_m) and self.owl_m > 0):
            raise UserError(f"owl_m must be > 0, got {self.owl_m}", "pass e.g. owl_m=5")

    def _check_sparsegpt(self, nm) -> None:
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping}",
                            "pass e.g. damping=0.01 (relative to the mean Hessian diagonal)")
        if self.sparsegpt_selection not in SELECTIONS:
            raise UserError(f"sparsegpt_selection '{self.sparsegpt_selection}' is not supported",
                            f"use one of {', '.join(SELECTIONS)}")
        if nm is not None and self.sparsegpt_blocksize % nm[1]:
            raise UserError(f"sparsegpt_blocksize {self.sparsegpt_blocksize} is not a multiple of "
                            f"M={nm[1]}", f"pass a sparsegpt_blocksize that is a multiple of {nm[1]}, e.g. 128")

    def check_model(self, model) -> None:
        """N:M: M divides every projection's input dim; block_hybrid: B divides rows and columns."""
        nm = self.nm
        shapes = [(i, name, *lin.weight.shape) for i, layer in enumerate(arch.decoder_layers(model))
                  for name, lin in arch.named_linears(layer)]
        for i, name, rows, cols in shapes:
            if nm is not None and cols % nm[1]:
                raise UserError(f"M={nm[1]} of {self.sparsity_pattern} does not divide the input "
                                f"dimension {cols} of layer {i} {name}",
                                f"use an M dividing {cols}, e.g. {_divisor_hint(cols)}, or the unstructured pattern")
            if self.method == "block_hybrid" and (rows % self.block_size or cols % self.block_size):
                g = math.gcd(*[d for s in shapes for d in s[2:]])
                raise UserError(f"block_size {self.block_size} does not divide layer {i} {name} "
                                f"weight [{rows}, {cols}]",
                                f"pass a block_size dividing every projection's rows and columns "
                                f"(their greatest common divisor is {g})")


def _divisor_hint(n: int) -> str:
    options = [f"{m // 2}:{m}" for m in (4, 8, 16) if n % m == 0]
    return " or ".join(options) if options else "the unstructured pattern"


@dataclass(frozen=True)
class SparsitySection(Section):
    """sparsity methods (wanda, sparsegpt, magnitude_unstructured, block_hybrid): zeros inside weights"""
    sparsity: float | None = knob(None, "fraction of the projection weights set to zero, in [0, 1); none: "
                                  "implied by an N:M pattern or block_hybrid's tiers")
    sparsity_pattern: str = knob(UNSTRUCTURED, "unstructured, or N:M (N non-zeros kept in every M consecutive "
                                 "input weights of a row, e.g. 2:4, 4:8)")
    block_size: int = knob(16, "block_hybrid: tile side B (B x B tiles)", low=1)
    tier_fractions: str = knob("0.35,0.45,0.2", "block_hybrid: fractions of tiles kept dense, made N:M, removed")
    owl: bool = knob(False, "OWL: non-uniform layer sparsity from activation outliers (mean = the target)")
    owl_lambda: float = knob(0.08, "OWL: span of the layer rates (2*lambda around the target)", low=0.0)
    owl_m: float = knob(5.0, "OWL: outlier = score above owl_m x its layer's mean", low=0.0, low_open=True)
    sparsegpt_blocksize: int = knob(128, "sparsegpt: columns per lazy-update block", low=1)
    sparsegpt_selection: str = knob("block", "sparsegpt, unstructured: mask chosen per block (the paper) or per row",
                                    choices=SELECTIONS)
    hessian_dtype: str = knob("float32", "sparsegpt: dtype of X^T X and the row updates", choices=HESSIAN_DTYPES)
    sparse_format: str = knob("dense", "checkpoint format: dense (a normal HF checkpoint, zeros in place) or "
                              "compressed (compressed-tensors, for vLLM)", choices=SPARSE_FORMATS)

    def to_config(self, method: str, damping: float | None = None) -> SparsityConfig:
        """The runtime settings of ``method`` (validated without a model)."""
        cfg = SparsityConfig(method, self.sparsity, self.sparsity_pattern, self.block_size, self.tier_fractions,
                             self.owl, self.owl_lambda, self.owl_m, self.sparsegpt_blocksize,
                             self.sparsegpt_selection, DEFAULT_DAMPING if damping is None else damping,
                             self.hessian_dtype)
        cfg.validate()
        return cfg
