"""bench.update_survival on a small tensor: exact mode rounding to nearest drops bfloat16 updates far
below one ulp; stochastic rounding of the update keeps them, in place and in exact mode."""
from bench.update_survival import main


def test_stochastic_rounding_of_the_update_keeps_sub_ulp_updates(tmp_path):
    rows = main(["--out", str(tmp_path), "--numel", "65536", "--steps", "40"])
    slope = {(r["dtype"], r["perturbation"], r["mode"]): r["slope"] for r in rows}
    assert slope[("bfloat16", "exact", "nearest")] < 0.6
    for dtype in ("bfloat16", "float16"):
        for perturbation in ("inplace", "exact"):
            assert abs(slope[(dtype, perturbation, "update")] - 1) < 0.15, (dtype, perturbation)
    assert (tmp_path / "summary.md").exists()
