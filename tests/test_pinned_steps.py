"""Behaviour pinned across refactors: 20 MeZO steps of a small model on CPU, recorded once (weights,
losses and projected gradients of every step) and checked bit for bit.

The recording (tests/data/pinned_steps.json) was made at commit 4e74f44, before the step engine and
op layer were restructured; any later change that alters a bit of a step fails here. The bfloat16
cases of that recording round stochastically in every pass (``stochastic_rounding=True``, then the
default); the "-default" cases, recorded when the default became stochastic rounding of the update
pass only, pin that default. Covered: the
in-place and exact modes through ``fastmezo.patch`` (float32, and bfloat16 with stochastic rounding),
gradient accumulation as the Trainer drives it (``accumulate`` twice, then ``step()`` without a
closure), the three backends that run on a CPU (native C++, the torch oracle, Triton through its
interpreter), and the Hugging Face Trainer itself.

Bits of a forward depend on the CPU's vector unit and on torch's CPU matmul kernels; the recording
names the torch CPU capability and the torch version it was made with, and a run on another one is
skipped with that reason rather than compared. Regenerate (only when a change of behaviour is intended, and say so in the commit):
``python tests/test_pinned_steps.py --record``; ``--record-missing`` records only new cases.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys

import pytest
import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastmezo  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "pinned_steps.json"
STEPS = 20


class _Tiny(torch.nn.Module):
    """Embedding, LayerNorm, two Linear layers (with biases): the no-decay rule applies to some."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.layer_norm = torch.nn.LayerNorm(16)
        self.fc1 = torch.nn.Linear(16, 24)
        self.fc2 = torch.nn.Linear(24, 32)

    def forward(self, ids, labels):
        h = self.layer_norm(self.embed(ids))
        logits = self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 32).float(), labels.reshape(-1))


def _model(dtype=torch.float32) -> _Tiny:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return _Tiny().to(dtype)


def _batches(n: int):
    g = torch.Generator().manual_seed(99)
    return [(torch.randint(0, 32, (4, 6), generator=g), torch.randint(0, 32, (4, 6), generator=g))
            for _ in range(n)]


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _record_patch(mode: str, dtype, backend: str | None, **options):
    model = _model(dtype)
    handle = fastmezo.patch(model, mode=mode, lr=5e-3, eps=1e-2, weight_decay=0.1, seed=2024,
                            backend=backend, **options)
    steps = []
    for ids, labels in _batches(STEPS):
        handle.step(lambda: model(ids, labels))
        opt = handle.optimizer
        steps.append(dict(loss_plus=opt.loss_plus.hex(), loss_minus=opt.loss_minus.hex(),
                          grads=[g.hex() for g in opt.projected_grads], weights=_digest(model)))
    handle.remove()
    return steps


def _record_accumulate(dtype, **options):
    from fastmezo.integrations.transformers import MeZOTrainerOptimizer

    model = _model(dtype)
    opt = MeZOTrainerOptimizer(fastmezo.param_groups(model, 0.1), lr=5e-3, eps=1e-2, seed=7, keys="name",
                               **options)
    batches = _batches(2 * STEPS)
    steps = []
    for t in range(STEPS):
        for ids, labels in batches[2 * t:2 * t + 2]:
            opt.accumulate(lambda: model(ids, labels) / 2)
        opt.step()
        steps.append(dict(loss_plus=opt.loss_plus.hex(), loss_minus=opt.loss_minus.hex(),
                          grads=[g.hex() for g in opt.projected_grads], weights=_digest(model)))
    return steps


def _record_trainer(tmp: pathlib.Path):
    """20 optimizer steps of MeZOTrainer on a 2-layer OPT (gradient accumulation 2, linear schedule)."""
    transformers = pytest.importorskip("transformers")
    from fastmezo.integrations.transformers import MeZOTrainer, mezo_optimizer_cls_and_kwargs

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
            max_position_embeddings=16, word_embed_proj_dim=16))
    ids = torch.randint(4, 64, (80, 8), generator=torch.Generator().manual_seed(5))
    data = [dict(input_ids=r, attention_mask=torch.ones_like(r), labels=r.clone()) for r in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=STEPS, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="linear", seed=3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0)
    seen = []

    class _Track(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            opt = trainer.optimizer
            while not isinstance(opt, fastmezo.MeZO):
                opt = opt.optimizer
            seen.append(dict(loss_plus=opt.loss_plus.hex(), loss_minus=opt.loss_minus.hex(),
                             grads=[g.hex() for g in opt.projected_grads], weights=_digest(model)))

    trainer = MeZOTrainer(model=model, args=args, train_dataset=data, callbacks=[_Track()],
                          optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=1e-2))
    with torch.random.fork_rng():
        trainer.train()
    return seen


CASES = {
    "inplace-fp32-native": lambda tmp: _record_patch("inplace", torch.float32, None),
    "exact-fp32-native": lambda tmp: _record_patch("exact", torch.float32, None),
    "inplace-bf16-native": lambda tmp: _record_patch("inplace", torch.bfloat16, None, stochastic_rounding=True),
    "inplace-bf16-native-default": lambda tmp: _record_patch("inplace", torch.bfloat16, None),
    "exact-bf16-native": lambda tmp: _record_patch("exact", torch.bfloat16, None),
    "inplace-fp32-oracle": lambda tmp: _record_patch("inplace", torch.float32, "oracle"),
    "inplace-bf16-triton": lambda tmp: _record_patch("inplace", torch.bfloat16, "triton", stochastic_rounding=True),
    "inplace-bf16-triton-default": lambda tmp: _record_patch("inplace", torch.bfloat16, "triton"),
    "exact-fp32-triton": lambda tmp: _record_patch("exact", torch.float32, "triton"),
    "accumulate-bf16": lambda tmp: _record_accumulate(torch.bfloat16, stochastic_rounding=True),
    "accumulate-bf16-default": lambda tmp: _record_accumulate(torch.bfloat16),
    "trainer-fp32": _record_trainer,
}


AUTOMATIC_BACKEND = ("accumulate-bf16", "accumulate-bf16-default", "trainer-fp32")


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def _run(name: str, tmp: pathlib.Path):
    torch.set_num_threads(1)   # intra-op threads can change a forward's summation order
    return CASES[name](tmp)


@pytest.fixture(scope="module")
def recording():
    if not DATA.exists():
        pytest.fail(f"{DATA} is missing; record it with `python {__file__} --record`")
    data = json.loads(DATA.read_text())
    if data["cpu_capability"] != _capability():
        pytest.skip(f"recorded on a CPU with torch capability {data['cpu_capability']}, this one is "
                    f"{_capability()}: forwards round differently")
    # Another torch brings other CPU matmul kernels (oneDNN), whose bfloat16 forwards round differently.
    if data["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        pytest.skip(f"recorded with torch {data['torch']}, this is {torch.__version__}: forwards may round "
                    "differently")
    return data


@pytest.mark.parametrize("name", sorted(CASES))
def test_steps_match_the_recording(name, recording, tmp_path):
    from conftest import HAS_TRITON, NATIVE_DEVICES, TRITON_DEVICE

    if "triton" in name and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if "triton" in name and TRITON_DEVICE != "cpu":
        pytest.skip("recorded through Triton's interpreter, which a machine with CUDA does not run")
    # The native cases, and those on the automatic backend (recorded where it chose native), need it.
    if ("native" in name or name in AUTOMATIC_BACKEND) and "cpu" not in NATIVE_DEVICES:
        pytest.skip("the native library is not built (the recording's backend)")
    threads = torch.get_num_threads()
    try:
        got = _run(name, tmp_path)
    finally:
        torch.set_num_threads(threads)
    want = recording["cases"][name]
    assert len(got) == len(want) == STEPS
    for t, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{name}: step {t} differs from the recording: {g} != {w}"


if __name__ == "__main__":
    if sys.argv[1:] not in (["--record"], ["--record-missing"]):
        sys.exit(f"usage: python {sys.argv[0]} --record | --record-missing  (all cases, or only those "
                 "the recording lacks, keeping the others' recorded bits)")
    import tempfile

    out = dict(cpu_capability=_capability(), torch=torch.__version__, cases={})
    if sys.argv[1] == "--record-missing":
        out = json.loads(DATA.read_text())
        if out["cpu_capability"] != _capability():
            sys.exit(f"the recording was made on a CPU with capability {out['cpu_capability']}; this one is "
                     f"{_capability()}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if case not in out["cases"]:
                out["cases"][case] = _run(case, pathlib.Path(tmp))
                print(case, out["cases"][case][-1]["weights"][:16])
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(out, indent=1) + "\n")
