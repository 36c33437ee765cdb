"""The noise contract (docs/noise.md, version 1), in plain Python.

Everything every backend must agree on lives here: the Philox4x32-10 constants, the counter layout,
the stream ids, how per-step seeds are derived from a base seed, and how tensor keys are made from
parameter names. The pure-Python Philox below works on Python ints; it is used for seed derivation
(a handful of calls per step) and as the known-answer oracle in tests. The tensor version of the same
generator is in :mod:`fastmezo.oracle`.
"""
from __future__ import annotations

import enum
import zlib

#: Version of the noise contract. Any change to what z is for a given (seed, key, index) bumps it.
NOISE_VERSION = 1

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

# Philox4x32 multipliers and Weyl key increments (Salmon et al., 2011; Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


class Noise(enum.IntEnum):
    """Distribution of the perturbation direction z. The value is also the Philox stream id (counter
    word 3), so Gaussian and Rademacher directions drawn with one seed are independent."""

    GAUSSIAN = 0
    RADEMACHER = 1


#: Elements served by one Philox call, per distribution (4 normals, or 128 sign bits).
ELEMENTS_PER_CALL = {Noise.GAUSSIAN: 4, Noise.RADEMACHER: 128}

#: Stream id of the random bits of stochastic rounding (docs/noise.md section 8).
STREAM_STOCHASTIC_ROUNDING = 2

#: Elements served by one Philox call of the rounding stream: each of the 4 words gives two 16-bit
#: draws (low half first), one per element.
ROUNDING_ELEMENTS_PER_CALL = 8

#: Stream id of seed derivation (counter word 3 of the call that maps (base, step, direction) to a seed).
STREAM_SEED_DERIVATION = 0x5EED5EED


def parse_noise(noise) -> Noise:
    """Accept a :class:`Noise`, its name ("gaussian", "rademacher") or its integer value."""
    if isinstance(noise, Noise):
        return noise
    if isinstance(noise, str):
        try:
            return Noise[noise.upper()]
        except KeyError:
            pass
    elif isinstance(noise, int) and not isinstance(noise, bool):
        try:
            return Noise(noise)
        except ValueError:
            pass
    choices = ", ".join(repr(n.name.lower()) for n in Noise)
    raise ValueError(f"unknown noise distribution {noise!r}; expected one of {choices}")


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS):
    """Philox4x32-R on Python ints: counter is 4 words, key 2 words (each taken mod 2**32).

    Returns the 4 output words. With rounds=10 this is Random123's philox4x32 (known-answer:
    counter (0,0,0,0), key (0,0) -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8).
    """
    c0, c1, c2, c3 = (int(w) & MASK32 for w in counter)
    k0, k1 = (int(w) & MASK32 for w in key)
    for _ in range(rounds):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32)
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def check_seed(seed, what: str = "seed") -> int:
    """Return seed as an int in [0, 2**64), or raise a TypeError/ValueError that names the problem."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            import numpy as np  # numpy integers are fine, floats are not

            if isinstance(seed, np.integer):
                seed = int(seed)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{what} must be an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed <= MASK64:
        raise ValueError(f"{what} must be in [0, 2**64), got {seed}")
    return seed


def derive_seed(base_seed: int, step: int, direction: int = 0) -> int:
    """The 64-bit seed of the perturbation direction ``direction`` of optimizer step ``step``.

    seed = words 0 and 1 (low, high) of Philox4x32-10 with key = base_seed (low word, high word) and
    counter = (step low word, step high word, direction, STREAM_SEED_DERIVATION). A run is therefore
    reproducible from its base seed alone, and distinct (step, direction) pairs give independent seeds.
    """
    base_seed = check_seed(base_seed, "base_seed")
    step = check_seed(step, "step")
    if isinstance(direction, bool) or not isinstance(direction, int):
        raise TypeError(f"direction must be an int in [0, 2**32), got {type(direction).__name__}")
    if not 0 <= direction <= MASK32:
        raise ValueError(f"direction must be in [0, 2**32), got {direction}")
    x = philox4x32((step & MASK32, step >> 32, direction, STREAM_SEED_DERIVATION),
                   (base_seed & MASK32, base_seed >> 32))
    return x[0] | (x[1] << 32)


def rounding_seed(seed: int, pass_index: int) -> int:
    """The 64-bit Philox key of the stochastic-rounding bits of pass ``pass_index`` of a step whose
    direction seed is ``seed`` (docs/noise.md section 8).

    = words 0 and 1 (low, high) of Philox4x32-10 with key = seed and counter = (pass_index low word,
    pass_index high word, 0, STREAM_STOCHASTIC_ROUNDING). Each pass of a step rounds with fresh bits,
    independent of z (another stream) and of the other passes.
    """
    seed = check_seed(seed)
    pass_index = check_seed(pass_index, "pass_index")
    x = philox4x32((pass_index & MASK32, pass_index >> 32, 0, STREAM_STOCHASTIC_ROUNDING),
                   (seed & MASK32, seed >> 32))
    return x[0] | (x[1] << 32)


# Prefixes that wrappers put in front of parameter names; stripped so that a parameter keeps its key
# whether the model is wrapped by DDP/FSDP (module.), torch.compile (_orig_mod.), or PEFT (base_model.model.).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                     "base_model.model.")


def canonical_name(name: str) -> str:
    """Parameter name with wrapper prefixes (anywhere in the dotted path) removed."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
            infix = "." + prefix
            if infix in name:
                name = name.replace(infix, ".")
                changed = True
    return name


def key_from_name(name: str) -> int:
    """Stable 32-bit tensor key of a parameter name: CRC-32 of its canonical name (UTF-8)."""
    return zlib.crc32(canonical_name(name).encode("utf-8")) & MASK32
