"""The device tables of the pass kernel's launches (kernels/axpbz.py): per tensor of a launch (x address,
output offset, numel, global offset, key), the padded block starts and the program -> tensor map,
built once per content and kept."""
import torch


class TableCache:
    """Device tables keyed by their content (addresses, sizes, offsets, keys): a training loop passes
    the same tensors every step, so the tables are built and copied to the device once. Keyed by
    content, an entry is right whenever it is found, whatever happened to the tensors in between.

    An entry holds the rows, the block starts and, once a Gaussian pass asked for it, a map of one
    int32 per program (BLOCK elements) to its tensor: 0.05% of the bytes of float16 tensors (12 MiB
    for an OPT-13B pass). Capacity: exact mode makes one table per hooked group of modules (its
    copies lie at fixed offsets from the first, so the same table serves every forward), so a model's
    few hundred groups must all fit; 4096 entries.

    A miss builds the table on the host and uploads it with ONE non-blocking copy from pinned memory:
    a copy from pageable memory synchronizes the stream (CUDA's rule for pageable host-to-device
    copies), and a sync per module forward makes exact mode host-bound (docs/perf.md)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self.entries: dict = {}
        self.misses = 0

    def get(self, rows: tuple, blocks: tuple, device: torch.device, mapped: bool = False):
        """(table, block starts padded to 2**log2t entries, log2t, program -> tensor map or None,
        programs) on ``device``; the map (one int32 per program) is built on the first ``mapped``
        request for a table of several tensors."""
        key = (device, rows, blocks)
        hit = self.entries.pop(key, None)
        if hit is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # A CUDA graph would copy the host buffer at every replay, long after it is reused.
                raise RuntimeError("a launch table was built while a CUDA graph captured; run the launch "
                                   "once eagerly first (its table is then cached)")
            self.misses += 1
            n_t = len(blocks)
            log2t = max(1, n_t.bit_length())                # 2**log2t > number of tensors
            starts = [0] * (1 << log2t)
            acc = 0
            for i, nb in enumerate(blocks):
                starts[i] = acc
                acc += nb
            for i in range(n_t, 1 << log2t):
                starts[i] = 1 << 62                           # above every program id
            host = torch.tensor(list(rows) + starts + list(blocks), dtype=torch.int64)
            if device.type == "cuda":
                buf = host.pin_memory().to(device, non_blocking=True)
            else:
                buf = host.to(device)
            # Views of one buffer: the table (rows of _COLS int64), the padded block starts, the counts.
            end = len(rows) + len(starts)
            hit = [buf[:len(rows)], buf[len(rows):end], log2t, None, acc, buf[end:]]
            if len(self.entries) >= self.capacity:
                self.entries.pop(next(iter(self.entries)))
        if mapped and hit[3] is None and len(blocks) > 1:
            # Built on the device, no host sync (output_size given): tensor t for each of its blocks.
            hit[3] = torch.repeat_interleave(torch.arange(len(blocks), dtype=torch.int32, device=device),
                                             hit[5], output_size=hit[4])
        self.entries[key] = hit                               # most recently used last
        return hit[:5]
