"""fastmezo's benchmarks (run as modules from the repository root, e.g. ``python -m bench.run_all``).

``common`` holds what the benchmarks share (device, provenance, timing, output, argument parsing),
``shapes`` and ``models`` the OPT parameter shapes and randomly initialised OPT models, ``baseline`` the
paper's way of perturbing and updating, which every benchmark measures fastmezo against.
"""
