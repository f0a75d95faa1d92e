"""Seeds derived from identities: the one rule every derived seed in hypersweep follows.

``derive_seed(*parts)`` hashes the canonical JSON of ``parts`` (sorted keys, no spaces)
with blake2b and keeps ``bits`` bits: stable across processes, hosts and Python versions
(never Python's salted ``hash()`` nor global RNG state), and distinct parts give
independent streams. Backend-free: imports neither numpy, torch nor jax.

Two derivations predate the canonical-JSON message and are recorded in
``benchmarks/baseline.parquet`` (the problem data, :func:`hypersweep.problems.data.rng`,
and the PyTorch ``stocbio`` minibatches): they keep their historical message through
:func:`seed_from_text`, the same hash, so their values do not move.

Ids (the cell id, the MLflow group id) are hashes too but not seeds; they live with the
records they name.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from typing import Any

_DIGEST_BYTES = 8


def seed_from_text(text: str, *, bits: int = 63) -> int:
    """The top ``bits`` (1–64) bits of blake2b-64 of ``text``, read little-endian."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"bits must be an integer in [1, 64]; got {bits!r}")
    digest = hashlib.blake2b(text.encode(), digest_size=_DIGEST_BYTES).digest()
    return int.from_bytes(digest, "little") >> (8 * _DIGEST_BYTES - bits)


def _plain(value: Any) -> Any:
    """Other integers and reals (numpy's) as Python numbers; anything else: ``TypeError``."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"derive_seed parts must be JSON values; got {type(value).__name__}")


def derive_seed(*parts: Any, bits: int = 63) -> int:
    """A stable seed in [0, 2**bits) from ``parts`` (JSON values: ints, strings, lists…).

    63 bits (the default) fit every generator that takes a signed 64-bit seed; pass
    ``bits=31`` for consumers limited to 32-bit seeds (JAX's ``PRNGKey`` without x64, Ray
    Tune's searchers).
    """
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), default=_plain)
    return seed_from_text(text, bits=bits)
