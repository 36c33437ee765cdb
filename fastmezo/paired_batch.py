"""The doubled batch of paired mode (fastmezo.paired) and the loss of each of its halves.

Rows 0..B-1 of a doubled batch are the "+" half, rows B..2B-1 the "-" half. Two users need that layout:
the wrapped forwards of fastmezo.paired.PairedPerturbation split a module's tensor arguments into the
two halves and stack the two outputs again (``_rows``, ``_half``, ``_split``, ``_stack``), and the
handle of fastmezo.paired_patch doubles the user's batch and turns the forward's output into (l+, l-)
(``double``, ``half_losses``, ``split_losses``). They live here, apart from the perturbation, because
they only look at rows and never at weights or noise.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


class PairedModeError(ValueError):
    """The model cannot run a paired forward (rows mixed, an odd batch, a parameter read outside).

    Defined here, the lowest of the paired modules, since splitting rows raises it too; fastmezo.paired
    imports it, and that is where callers take it from."""


# -- splitting a module's arguments into the two halves and stacking its outputs ---------------------
def _rows(args, kwargs):
    return max((t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()),
               default=None)


def _half(t, rows, first: bool):
    """The + (``first``) or - half of ``t`` when its dim 0 is a multiple of ``rows`` (the doubled batch,
    or batch and sequence flattened batch-major: its first half is still the + half's); a tensor of one
    row (broadcast over the batch, e.g. position ids) is expanded first, so that each half gets its own
    output rows. Anything else is returned as it is, for both halves."""
    if not (isinstance(t, torch.Tensor) and t.dim()):
        return t
    n = t.shape[0]
    if n == 1:
        t, n = t.expand(rows, *t.shape[1:]), rows
    elif n % rows:
        return t
    return t[:n // 2] if first else t[n // 2:]


def _split(args, kwargs, rows, first: bool):
    """(args, kwargs) of the + (``first``) or - half: :func:`_half` of every leaf."""
    return pytree.tree_map(lambda t: _half(t, rows, first), (args, kwargs))


def _stack(plus, minus):
    leaves_p, spec = pytree.tree_flatten(plus)
    leaves_m, spec_m = pytree.tree_flatten(minus)
    if spec != spec_m:
        raise PairedModeError("paired mode: a module returned differently structured outputs for the two halves")
    out = [torch.cat([a, b]) if isinstance(a, torch.Tensor) and a.dim() else a for a, b in zip(leaves_p, leaves_m)]
    return pytree.tree_unflatten(out, spec)


# -- the user's batch doubled, and the loss of each half ------------------------------------------------
def double(batch):
    """The batch stacked twice along dim 0 (every tensor of a dict, tuple or list, or a tensor)."""
    if isinstance(batch, torch.Tensor):
        return torch.cat([batch, batch])
    if isinstance(batch, dict):
        return {k: double(v) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(double(v) if isinstance(v, torch.Tensor) and v.dim() else v for v in batch)
    raise TypeError(f"paired mode takes a batch (dict, tuple, list or tensor) or a closure, not {type(batch).__name__}")


def half_losses(model, output, labels):
    """(l+, l-): the loss of each half of a doubled batch, as the model's own ``.loss`` would be for
    that half alone: shifted token cross-entropy for causal LMs, token cross-entropy for token
    classification, and the problem type of the config for sequence classification (regression,
    single-label, multi-label), labels -100 ignored where Hugging Face ignores them."""
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None:
        raise ValueError("paired mode: the model's output has no .logits to compute the loss of each half "
                         "from; give fastmezo.patch(model, mode='paired', loss_fn=...)")
    rows = logits.shape[0]
    if labels.shape[0] != rows or rows % 2:
        raise PairedModeError(f"paired mode: {rows} rows of logits and {labels.shape[0]} of labels; expected "
                              "one doubled batch (an even number of rows)")
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name.endswith(("ForCausalLM", "LMHeadModel")) and logits.dim() == 3:
        # Position t predicts token t + 1; the last position of a row predicts nothing (label -100), so
        # the logits stay one contiguous [tokens, vocabulary] matrix that the loss reads in chunks.
        labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    problem = getattr(config, "problem_type", None)
    if problem is None and logits.dim() == 2:       # Hugging Face's rule for sequence classification
        problem = ("regression" if logits.shape[-1] == 1 else "single_label_classification"
                   if not labels.is_floating_point() else "multi_label_classification")
    if logits.dim() == 3 or problem == "single_label_classification":      # tokens or classes
        loss, counted = _cross_entropy(logits, labels).reshape(rows, -1), (labels.reshape(rows, -1) != -100)
        h = rows // 2
        return tuple(loss[s].sum() / counted[s].sum() for s in (slice(0, h), slice(h, rows)))
    logits = logits.float()
    if problem == "regression":
        loss = torch.nn.functional.mse_loss(logits.squeeze(-1) if labels.dim() < logits.dim() else logits,
                                            labels.float(), reduction="none")
    elif problem == "multi_label_classification":
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    else:
        raise ValueError(f"paired mode: cannot tell the loss of {name} from logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)}; give fastmezo.patch(model, mode='paired', loss_fn=...)")
    loss = loss.reshape(rows, -1)
    h = rows // 2
    return loss[:h].mean(), loss[h:].mean()


#: Float32 logits the loss holds at a time (with their log-softmax): a doubled batch's logits over a
#: vocabulary of tens of thousands would otherwise be copied to float32 whole, twice. Small, so that the
#: loss's peak stays below an inference forward's (whose loss copies its logits to float32 whole); the
#: chunks' launches cost nothing measurable (docs/perf.md).
LOSS_CHUNK_BYTES = 8 << 20


def _cross_entropy(logits, labels):
    """Float32 cross-entropy of every row of classes (labels -100: 0), as rows of [..., classes]: never
    [batch, classes, tokens], which cross_entropy takes with a "spatial" softmax kernel that is slow for a
    vocabulary of tens of thousands; in chunks of LOSS_CHUNK_BYTES of float32 logits (each row's loss
    does not depend on the chunk)."""
    classes = logits.shape[-1]
    flat, targets = logits.reshape(-1, classes), labels.long().reshape(-1)
    loss = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    chunk = max(1, LOSS_CHUNK_BYTES // (4 * classes))
    for a in range(0, flat.shape[0], chunk):
        loss[a:a + chunk] = torch.nn.functional.cross_entropy(flat[a:a + chunk].float(), targets[a:a + chunk],
                                                              reduction="none", ignore_index=-100)
    return loss


def split_losses(losses):
    """(l+, l-) from what a loss function returned: a pair, or one loss per row of the doubled batch."""
    if isinstance(losses, (tuple, list)) and len(losses) == 2:
        return tuple(losses)
    if isinstance(losses, torch.Tensor) and losses.dim() == 1 and losses.numel() % 2 == 0 and losses.numel():
        h = losses.numel() // 2
        return losses[:h].mean(), losses[h:].mean()
    raise ValueError("paired mode: the loss function must return (l_plus, l_minus) or one loss per row of the "
                     "doubled batch (a 1-D tensor of even length), got "
                     f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}")
