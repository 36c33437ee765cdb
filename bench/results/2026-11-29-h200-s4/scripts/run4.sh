export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r4; mkdir -p $R
timeout 150 python3 -m pytest -q tests/test_noise.py tests/test_kernels.py tests/test_rounding.py tests/test_exact.py -k "cuda or tables" > $R/pytest_cuda.log 2>&1; tail -2 $R/pytest_cuda.log
timeout 120 python3 .scratch/prof_exact.py > $R/prof_exact.txt 2>&1; grep -E "group_bytes|plain forward" $R/prof_exact.txt
timeout 300 python3 bench/run_all.py --skip-passes --models opt-1.3b,opt-13b --dtypes float16 --configs 16x256,1x128 --out $R/steps > $R/steps.log 2>&1; grep -E "overhead / |inplace" $R/steps.log | cut -c1-175
