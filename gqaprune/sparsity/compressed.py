"""compressed-tensors export of a sparse model (``sparse_format=compressed``) — where possible.

The compressed-tensors formats for sparse weights are ``sparse-24-bitmask`` (2:4) and
``sparse-bitmask`` (any pattern): values + packed bitmask per weight, a ``sparsity_config`` in
config.json. Their writers are the package's sparse compressors, looked up by format name in its
compressor registry (``BaseCompressor``). State of the ecosystem this project runs on
(transformers 5, checked with compressed-tensors 0.20.1):

* compressed-tensors removed its sparse compressors in 0.15 (only the legacy config classes
  remain; ``ModelCompressor.update_config`` writes an empty ``sparsity_config``), and the last
  release that has them, 0.14.0.1, requires transformers < 5;
* transformers 5's ``CompressedTensorsConfig`` no longer reads a ``sparsity_config``;
* vLLM dropped serving Sparse24 compressed-tensors checkpoints (NotImplementedError since 0.19.1).

So no installable compressed-tensors can write these formats next to transformers 5, and we do not
hand-roll them: :func:`save_compressed` checks the installed package's registry and raises a
:class:`UserError` naming the alternative — the normal Hugging Face checkpoint, which stores the
zeros in place (``sparse_format=dense``) and which vLLM serves as a dense model.
"""
from __future__ import annotations

from importlib import metadata
from typing import NoReturn

from gqaprune.errors import UserError

SPARSE_24 = "sparse-24-bitmask"
SPARSE_BITMASK = "sparse-bitmask"
ALTERNATIVE = ("save the normal Hugging Face checkpoint instead (sparse_format=dense): it stores "
               "the zeros in place, reloads with from_pretrained and vLLM serves it as a dense model")


def format_for(pattern: str) -> str:
    """compressed-tensors format for a sparsity pattern: 2:4 -> sparse-24-bitmask, else sparse-bitmask."""
    return SPARSE_24 if pattern == "2:4" else SPARSE_BITMASK


def installed_version() -> str | None:
    try:
        return metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        return None


def writable_sparse_formats() -> tuple[str, ...]:
    """Sparse formats the installed compressed-tensors has a compressor for (its registry)."""
    try:
        from compressed_tensors.compressors import BaseCompressor
    except ImportError:
        return ()
    names = set(BaseCompressor.registered_names())
    return tuple(f for f in (SPARSE_24, SPARSE_BITMASK) if f in names)


def check_compressed_export(pattern: str) -> NoReturn:
    """Raise the UserError that says why ``pattern`` cannot be exported here, and the alternative.

    Every installable compressed-tensors (with transformers 5) ends in the first two branches.
    """
    fmt = format_for(pattern)
    version = installed_version()
    if version is None:
        raise UserError(f"sparse_format=compressed needs the compressed-tensors package, and no "
                        f"release compatible with transformers 5 can write {fmt}", ALTERNATIVE)
    if fmt not in writable_sparse_formats():
        raise UserError(f"compressed-tensors {version} has no {fmt} compressor (sparse compressors "
                        f"were removed in 0.15; 0.14 needs transformers < 5)", ALTERNATIVE)
    # A release that registers sparse compressors again has an interface we have not seen.
    raise UserError(f"gqaprune does not drive the {fmt} compressor of compressed-tensors {version} yet",
                    ALTERNATIVE)


def save_compressed(model, tokenizer, out_dir, pattern: str) -> NoReturn:
    """The ``sparse_format=compressed`` entry: refuses with the reason and the alternative (module doc)."""
    check_compressed_export(pattern)
