"""Integrations of fastmezo with other training code. Today: the drop-in backend for MeZO frontends
that follow the paper's trainer (:func:`use_fastmezo`)."""
from .reference_frontend import FastMeZOFrontend, use_fastmezo

__all__ = ["FastMeZOFrontend", "use_fastmezo"]

# The Hugging Face Trainer integration imports transformers, so it loads only on first use:
# ``from fastmezo.integrations.transformers import MeZOTrainer`` (or ``fastmezo.integrations.MeZOTrainer``).
_TRANSFORMERS_NAMES = ("MeZOTrainer", "MeZOTrainerMixin", "MeZOTrainerOptimizer", "mezo_optimizer_cls_and_kwargs")


def __getattr__(name):
    if name in _TRANSFORMERS_NAMES or name == "transformers":
        import importlib

        module = importlib.import_module(".transformers", __name__)
        return module if name == "transformers" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
