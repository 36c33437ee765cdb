"""The fused pass: out <- a * x + b * z(seed, key), one read of x and one write, z made in registers.

Every MeZO pass is this one kernel with different (a, b):
  perturb by alpha            a = 1,             b = alpha
  restore and update          a = 1 - lr * wd,   b = (1 - lr * wd) * eps - lr * g
  exact mode's perturbed copy a = 1,             b = alpha,   out != x
Arithmetic is float32; the result is rounded once to the storage dtype, to nearest or stochastically
(docs/noise.md section 8, random bits from Philox stream 2).

One launch covers a whole *table* of tensors of one dtype: per tensor (x address, out address, numel,
global offset, key) in an int64 table on the device, and the first block of each tensor in a sorted
``starts`` table; a program finds its tensor by binary search. A model's ~400 tensors take one launch
instead of 400: the host time of a launch exceeds the device time of a pass over a typical tensor of a
1B-parameter model (docs/perf.md).

A program covers BLOCK consecutive elements. Blocks are aligned to the *global* element index
(offset + local index) in units of G = max(elements per Philox call, 8), so the noise and the rounding
bits never depend on the block size or on where a shard starts. ALIGNED (offset % G == 0 and 16-byte
aligned addresses for every tensor of the launch) lets full blocks use unmasked 16-byte vector
accesses; only each tensor's last block is masked. FAST (fast sin/cos and log2, correctly rounded
division via libdevice) is on for compiled kernels and off in the interpreter, which has no libdevice.
"""
import os
import weakref

import torch
import triton
import triton.language as tl

from .launch_tables import TableCache
from .philox import gaussian_rows, rademacher_block, round_stochastic, round_to_nearest, rounding_draws, rounding_rows

# Default elements per program. Large blocks keep the interpreter (which runs programs one by one)
# fast; on the GPU 4096 elements per program with 4 warps is a sound starting point.
DEFAULT_BLOCK = 4096
INTERPRETER_BLOCK = 1 << 16
# Elements a program computes at a time (its block in chunks, on the GPU only; see the kernel).
DEFAULT_CHUNK = 1024

# Columns of the int64 tensor table: x's address, the output's offset in elements from the launch's
# first output (proto_ptr), numel, global index of the first element, noise key. Offsets rather than
# output addresses: exact mode's perturbed copies are carved from one buffer per group of modules,
# whose address changes from forward to forward (the caching allocator), their offsets do not; so the
# table, keyed by its content, is built and uploaded once.
_X, _OUT, _N, _OFFSET, _KEY, _COLS = 0, 1, 2, 3, 4, 5


@triton.jit
def _round_store(out_ptr, idx, mask, y, r, ROUND: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr):
    """Round y (stochastically by the draws r with ROUND) and store it to out."""
    if ROUND:
        v = round_stochastic(y, r, out_ptr.dtype.element_ty, FAST)
    else:
        v = round_to_nearest(y, out_ptr.dtype.element_ty, FAST)
    if MASKED:
        tl.store(out_ptr + idx, v, mask=mask)
    else:
        tl.store(out_ptr + idx, v)


@triton.jit
def _pass_block(x_ptr, out_ptr, idx, mask, z, r, a, b, pair_delta, LOAD_X: tl.constexpr, SCALE_X: tl.constexpr,
                PAIR: tl.constexpr, ROUND: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr):
    """Load x (masked or not), y = a * x + b * z in float32 (x + b * z when a is 1: the same bits), round
    and store to out. PAIR: also a * x - b * z to out + pair_delta, the bits of a pass with -b (b * z
    negated is exact), from the same z and rounding draws."""
    bz = b * z
    if LOAD_X:
        if MASKED:
            x = tl.load(x_ptr + idx, mask=mask).to(tl.float32)
        else:
            x = tl.load(x_ptr + idx).to(tl.float32)
        if SCALE_X:
            x = a * x
        y = x + bz
    else:
        y = bz
    _round_store(out_ptr, idx, mask, y, r, ROUND, MASKED, FAST)
    if PAIR:
        if LOAD_X:
            y = x + (-bz)
        else:
            y = -bz
        _round_store(out_ptr + pair_delta, idx, mask, y, r, ROUND, MASKED, FAST)


# Seeds, coefficients and table sizes are not specialized: they never cause a recompilation.
@triton.jit(do_not_specialize=["a", "b", "seed_lo", "seed_hi", "rseed_lo", "rseed_hi", "total"])
def _axpbz_table_kernel(proto_ptr, table_ptr, starts_ptr, map_ptr, total, a, b, seed_lo, seed_hi, seed_ptr,
                        rseed_lo, rseed_hi, pair_delta, NOISE: tl.constexpr, BLOCK: tl.constexpr,
                        CHUNK: tl.constexpr, LOOKUP: tl.constexpr, LOG2T: tl.constexpr, LOAD_X: tl.constexpr,
                        SCALE_X: tl.constexpr, OUT: tl.constexpr, PAIR: tl.constexpr, ROUND: tl.constexpr,
                        ALIGNED: tl.constexpr, FAST: tl.constexpr, SEED_AT: tl.constexpr):
    G: tl.constexpr = 8 if NOISE == 0 else 128              # block alignment: z calls and rounding calls
    if SEED_AT:      # the seed's two words in device memory (a CUDA graph's replay writes each step's there)
        seed_lo = tl.load(seed_ptr)
        seed_hi = tl.load(seed_ptr + 1)
    pid = tl.program_id(0).to(tl.int64)
    # The tensor of this program (LOOKUP 0: the only one). LOOKUP 1, Gaussian passes: read from a map
    # of one int32 per program, one load. LOOKUP 2, Rademacher passes: the last t with starts[t] <= pid,
    # a binary search (starts is padded to 2**LOG2T entries with a value above every pid, so it needs
    # no bounds checks). The search's extra instructions slow the compute-bound Gaussian pass, while
    # the latency-bound Rademacher pass is faster with the search, whose loads hit in cache where the
    # map entry comes from DRAM (docs/perf.md).
    if LOOKUP == 1:
        t = tl.load(map_ptr + pid).to(tl.int64)
    elif LOOKUP == 2:
        t = pid * 0
        for k in tl.static_range(LOG2T):
            step = 1 << (LOG2T - 1 - k)
            t = tl.where(tl.load(starts_ptr + t + step) <= pid, t + step, t)
    else:
        t = pid * 0
    blk = pid - tl.load(starts_ptr + t)
    row = table_ptr + t * 5
    ELEM = proto_ptr.dtype.element_ty
    x_ptr = tl.load(row + 0).to(tl.pointer_type(ELEM))
    if OUT:
        out_ptr = proto_ptr + tl.load(row + 1)
    else:
        out_ptr = x_ptr
    if ALIGNED:
        # Every address of this launch is 16-byte aligned (the launcher checks): with that and block
        # starts at multiples of BLOCK, Triton emits 16-byte vector loads and stores.
        x_ptr = tl.multiple_of(x_ptr, 16)
        out_ptr = tl.multiple_of(out_ptr, 16)
    n = tl.load(row + 2)
    offset = tl.load(row + 3)
    key = tl.load(row + 4).to(tl.int32)
    block_global = (offset // G) * G + blk * BLOCK          # global index of this block's first element
    # The block in chunks, one after another: a thread then holds the noise and rounding draws of a
    # chunk rather than of the whole block, so fewer registers and more resident warps hide the memory
    # latency, while the program -> tensor map keeps one entry per (larger) block.
    for c in tl.range(0, BLOCK // CHUNK):
        first_global = block_global + c * CHUNK
        # Gaussian chunks as [CHUNK / 8, 8] tiles (a row: two noise calls, one rounding call, one 16-byte
        # vector of float16), so that a thread's values never move between threads (philox.tile8);
        # Rademacher chunks (128 elements a call) as 1-D vectors, whose layout needs no exchange.
        if NOISE == 0:
            rows = first_global // 8 + tl.arange(0, CHUNK // 8).to(tl.int64)
            z = gaussian_rows(rows, seed_lo, seed_hi, key, FAST)
            lane = tl.arange(0, CHUNK // 8).to(tl.int64)[:, None] * 8 + tl.arange(0, 8)[None, :]
        else:
            z = rademacher_block(first_global // 128 + tl.arange(0, CHUNK // 128).to(tl.int64), seed_lo, seed_hi,
                                 key, FAST)
            lane = tl.arange(0, CHUNK).to(tl.int64)
        r = 0
        if ROUND:
            if NOISE == 0:
                r = rounding_rows(rows, rseed_lo, rseed_hi, key, FAST)
            else:
                r = rounding_draws(first_global // 8, CHUNK // 8, rseed_lo, rseed_hi, key, FAST)
        if ALIGNED:
            start = blk * BLOCK + c * CHUNK
            idx = start + lane
            if start + CHUNK <= n:
                _pass_block(x_ptr, out_ptr, idx, idx < n, z, r, a, b, pair_delta, LOAD_X, SCALE_X, PAIR, ROUND, False, FAST)
            else:
                _pass_block(x_ptr, out_ptr, idx, idx < n, z, r, a, b, pair_delta, LOAD_X, SCALE_X, PAIR, ROUND, True, FAST)
        else:
            idx = first_global - offset + lane     # index into x
            _pass_block(x_ptr, out_ptr, idx, (idx >= 0) & (idx < n), z, r, a, b, pair_delta, LOAD_X, SCALE_X, PAIR, ROUND, True, FAST)


# Triton reads TRITON_INTERPRET when it is imported, so it cannot change later: read it once here
# rather than on every launch (the values triton accepts; fastmezo.backends.triton_interpreter_on
# reads it the same way). No fastmezo import here: this package must import on its own.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _as_i32(word: int) -> int:
    """uint32 -> the int32 with the same bits (one kernel signature whatever the value)."""
    return word - (1 << 32) if word >= (1 << 31) else word


# a * x + b * z is computed as written (two roundings), not contracted into an FMA: the oracle, the
# native kernels and every code path of this kernel (aligned or not) then produce the same float32 y,
# so stochastic rounding stores bit-identical values and a shard equals the whole tensor. Contracted,
# the aligned and masked paths fuse differently and elements near a cancellation round the other way
# (docs/perf.md). Library calls (log, sin, cos) keep their own FMAs.
_NO_FMA_CONTRACTION = {} if _INTERPRETING else {"enable_fp_fusion": False}


def seed_words(seed: int) -> list[int]:
    """The (low, high) words of a uint64 seed as int32 values: what a device seed tensor holds."""
    return [_as_i32(seed & 0xFFFFFFFF), _as_i32((seed >> 32) & 0xFFFFFFFF)]


def _seed_args(seed, dummy):
    """(seed_lo, seed_hi, seed_ptr, SEED_AT) of a launch: ``seed`` a uint64, or an int32 tensor of its
    two words (:func:`seed_words`) on the launch's device, which the kernel reads when it runs (a captured
    launch then takes whatever seed is written there before a replay)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int32 or seed.numel() != 2 or seed.device != dummy.device:
            raise ValueError(f"a device seed is an int32 tensor of 2 words on {dummy.device}, got "
                             f"{seed.dtype} x {seed.numel()} on {seed.device}")
        return 0, 0, seed, True
    lo, hi = seed_words(seed)
    return lo, hi, dummy, False


#: While this list is set (:func:`keeping`), the device tables of every called launch are appended to
#: it: a CUDA graph that captured the launch reads them at each replay and must keep them alive (and
#: only them: an output buffer of the capture is the graph's memory pool's).
_kept = None


class keeping:
    """Within the context, the tables of every called Launches are appended to ``kept`` (a CUDA graph's
    capture)."""

    def __init__(self, kept: list):
        self.kept = kept

    def __enter__(self):
        global _kept
        self.outer, _kept = _kept, self.kept
        return self.kept

    def __exit__(self, *exc):
        global _kept
        _kept = self.outer


def _alignment(noise: int) -> int:
    return 8 if noise == 0 else 128


_tables = TableCache()


def _block_and_chunk(device, g: int, block: int | None = None, chunk: int | None = None, span: int | None = None):
    """(elements per program, elements computed at a time) of a pass on ``device`` with alignment g:
    the defaults unless given, the block at least g, the chunk dividing it. ``span``: the most elements
    one tensor of the pass spans from an aligned start; the interpreter, which computes every element of a
    program's block, masked or not, takes no larger block than that needs."""
    if block is None:
        block = INTERPRETER_BLOCK if device.type == "cpu" else DEFAULT_BLOCK
        if span is not None and device.type == "cpu":
            block = min(block, 1 << max(span - 1, 1).bit_length())
    block = max(block, g)
    if chunk is None:
        chunk = block if device.type == "cpu" else min(block, max(DEFAULT_CHUNK, g))
    if chunk % g or block % chunk:
        raise ValueError(f"chunk {chunk} must divide the block {block} and be a multiple of {g}")
    return block, chunk


class Launches:
    """The launches of one pass over a fixed set of tensors, prepared once: the tensors grouped by
    dtype and alignment, each group's table on the device. A training loop passes the same tensors
    every step, so a prepared set makes each pass a few kernel launches with no per-tensor host work.
    Valid while the tensors stay where they were (the caller re-prepares when they move)."""

    def __init__(self, tensors, keys, noise: int, offsets=None, outs=None, block: int | None = None,
                 chunk: int | None = None, pair_delta: int | None = None, relocatable: bool = False):
        n_t = len(tensors)
        offsets = [0] * n_t if offsets is None else list(offsets)
        outs = list(tensors) if outs is None else list(outs)
        self.out = pair_delta is not None or any(o is not x for o, x in zip(outs, tensors))
        self.noise = noise
        # Pairs: every output has a second one pair_delta elements after it (a * x - b * z there), which
        # needs one element size for the whole launch.
        self.pair_delta = pair_delta
        delta_bytes = 0
        if pair_delta is not None and outs:
            if len({o.dtype for o in outs}) > 1:
                raise ValueError("a pair pass needs outputs of one dtype (pair_delta counts elements)")
            delta_bytes = pair_delta * outs[0].element_size()
        g = _alignment(noise)
        groups: dict = {}
        # One walk over the tensors reads each one's numel and addresses once (host time per tensor
        # counts: exact mode prepares per group of modules and forward).
        for x, o, key, off in zip(tensors, outs, keys, offsets):
            n = x.numel()
            if n == 0:
                continue
            xp, op = x.data_ptr(), o.data_ptr()
            aligned = off % g == 0 and xp % 16 == 0 and op % 16 == 0 and delta_bytes % 16 == 0
            groups.setdefault((x.dtype, aligned), []).append((o, xp, op, n, key, off))
        self.launches = []
        if not groups:
            return
        device = tensors[0].device
        span = max(m[3] + m[5] % g for members in groups.values() for m in members)
        self.block, self.chunk = _block_and_chunk(device, g, block, chunk, span)
        for (dtype, aligned), members in groups.items():
            rows, blocks = [], []
            proto = members[0][0]                              # the first output: offsets count from it
            base, esize = members[0][2], proto.element_size()
            for o, xp, op, n, key, off in members:
                delta, rest = divmod(op - base, esize)
                if rest:  # pragma: no cover  (tensors of one dtype sit at multiples of its size)
                    raise ValueError("outputs of one launch must lie a whole number of elements apart")
                rows += (xp, delta, n, off, key & 0xFFFFFFFF)
                blocks.append(-(-(n + off % g) // self.block))   # ceil; triton.cdiv is a jit function
            table, starts, log2t, mapping, total = _tables.get(tuple(rows), tuple(blocks), device, noise == 0)
            # By the noise, not by whether the cached entry has a map (a Gaussian pass over the same
            # tensors may have built one): Rademacher passes search, which suits them better.
            lookup = 0 if len(blocks) == 1 else 1 if noise == 0 else 2
            # In place, the prototype (whose address is the launch's base pointer) is held weakly: a
            # prepared launch must not keep its tensors alive (a cache of plans holds launches between
            # calls); out of place the output buffer is the launch's own.
            # Relocatable (outputs of one dtype carved from one buffer, which each call names): nothing
            # held, the group's first output found at its distance from the first output of all.
            ref = None if relocatable else (lambda p=proto: p) if self.out else weakref.ref(proto)
            shift = (base - outs[0].data_ptr()) // esize
            self.launches.append((ref, table, starts, starts if mapping is None else mapping, total, lookup,
                                  log2t if lookup == 2 else 0, dtype != torch.float32, aligned, shift))

    def __call__(self, a: float, b: float, seed, round_seed: int | None = None, load_x: bool = True,
                 num_warps: int = 4, outs_at=None) -> None:
        """out_i <- a * x_i + b * z(seed, key_i) for every prepared tensor (round_seed: stochastic rounding
        of float16/bfloat16 results; seed: a uint64 or a device tensor of its words, :func:`_seed_args`).
        ``outs_at`` (relocatable launches: required): a 1-D tensor of the outputs' dtype, 16-byte aligned,
        at which the first output now starts, the others at their prepared distances from it."""
        if outs_at is not None and outs_at.data_ptr() % 16:
            raise ValueError("the outputs of a relocated launch must start 16-byte aligned")
        if not self.launches:
            return
        rseed_lo, rseed_hi = seed_words(0 if round_seed is None else round_seed)
        seed_lo, seed_hi, seed_ptr, seed_at = _seed_args(seed, self.launches[0][1])
        if _kept is not None:
            _kept.extend(launch[1:4] for launch in self.launches)
        for ref, table, starts, mapping, total, lookup, log2t, low_precision, aligned, shift in self.launches:
            proto = outs_at[shift:] if outs_at is not None else None if ref is None else ref()
            if proto is None:
                raise RuntimeError("the tensors of a prepared launch were freed (or a relocatable launch was "
                                   "called without outs_at); prepare it again")
            _axpbz_table_kernel[(total,)](
                proto, table, starts, mapping, total, float(a), float(b), seed_lo, seed_hi, seed_ptr,
                rseed_lo, rseed_hi, self.pair_delta or 0,
                NOISE=self.noise, BLOCK=self.block, CHUNK=self.chunk, LOOKUP=lookup, LOG2T=log2t, LOAD_X=load_x,
                SCALE_X=float(a) != 1.0, OUT=self.out, PAIR=self.pair_delta is not None,
                ROUND=round_seed is not None and low_precision, ALIGNED=aligned, FAST=not _INTERPRETING,
                SEED_AT=seed_at, num_warps=num_warps, **_NO_FMA_CONTRACTION)


def rows_pass_(rows, b: float, seed, key: int, offsets, noise: int, block: int | None = None) -> None:
    """rows[i] <- rows[i] + b * z over the stream of ``key`` from ``offsets[i]``, in place, for the rows of
    a contiguous 2-D tensor: the pass over rows gathered from a larger tensor (paired mode's embedding
    lookups), whose global offsets are a device tensor. The launch table is built on the device from
    ``offsets`` (int64, one per row), so nothing waits for the device; every row takes the masked path
    (its offset need not be aligned). ``seed`` as for :meth:`Launches.__call__`."""
    n, width = rows.shape
    if n == 0 or width == 0:
        return
    device = rows.device
    g = _alignment(noise)
    block, chunk = _block_and_chunk(device, g, block, span=width + g - 1)
    per_row = -(-(width + g - 1) // block)        # blocks of the longest row span (offset % g <= g - 1)
    index = torch.arange(n, device=device, dtype=torch.int64)
    table = torch.stack([rows.data_ptr() + index * (width * rows.element_size()), index * width,
                         torch.full_like(index, width), offsets.to(device=device, dtype=torch.int64),
                         torch.full_like(index, key & 0xFFFFFFFF)], dim=1).reshape(-1)
    starts = index * per_row
    mapping = (torch.arange(n * per_row, device=device, dtype=torch.int64) // per_row).to(torch.int32)
    seed_lo, seed_hi, seed_ptr, seed_at = _seed_args(seed, table)
    _axpbz_table_kernel[(n * per_row,)](
        rows, table, starts, mapping, n * per_row, 1.0, float(b), seed_lo, seed_hi, seed_ptr, 0, 0, 0, NOISE=noise,
        BLOCK=block, CHUNK=chunk, LOOKUP=1, LOG2T=0, LOAD_X=True, SCALE_X=False, OUT=True, PAIR=False, ROUND=False,
        ALIGNED=False, FAST=not _INTERPRETING, SEED_AT=seed_at, num_warps=4, **_NO_FMA_CONTRACTION)


def axpbz_multi_(tensors, a: float, b: float, seed: int, keys, noise: int, offsets=None, *, outs=None,
                 round_seed: int | None = None, load_x: bool = True, block: int | None = None,
                 num_warps: int = 4, chunk: int | None = None, pair_delta: int | None = None) -> None:
    """One pass over several contiguous tensors of one device: out_i <- a * x_i + b * z(seed, key_i).

    Coefficients a and b are shared (the optimizer's passes have one (a, b) per param group). outs
    (default: in place), offsets (global index of each tensor's first element; default 0), round_seed
    (stochastic rounding of float16/bfloat16 results; default round to nearest). Tensors are grouped by
    dtype and alignment, one launch per group; the tables come from a cache keyed by their content.
    pair_delta (outputs of one dtype): also a * x_i - b * z_i, pair_delta elements after out_i.
    """
    Launches(tensors, keys, noise, offsets, outs, block, chunk, pair_delta)(a, b, seed, round_seed, load_x, num_warps)


def axpbz_(x, a: float, b: float, seed: int, key: int, noise: int, offset: int = 0,
           block: int | None = None, load_x: bool = True, num_warps: int = 4, out=None,
           round_seed: int | None = None) -> None:
    """The fused pass on one contiguous tensor x (any floating dtype, any device Triton runs on).

    seed is a uint64, key a uint32, noise 0 (Gaussian) or 1 (Rademacher), offset the global index of
    x's first element (non-zero for a shard of a larger tensor). With load_x=False, x <- b * z.
    """
    axpbz_multi_([x], a, b, seed, [key], noise, [offset], outs=None if out is None else [out],
                 round_seed=round_seed, load_x=load_x, block=block, num_warps=num_warps)
