"""Integrations of fastmezo with other training code. Today: the drop-in backend for MeZO frontends
that follow the paper's trainer (:func:`use_fastmezo`)."""
from .reference_frontend import FastMeZOFrontend, use_fastmezo

__all__ = ["FastMeZOFrontend", "use_fastmezo"]
