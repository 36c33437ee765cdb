export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r9; mkdir -p $R
timeout 150 python3 -m pytest -q tests/test_noise.py tests/test_kernels.py tests/test_rounding.py tests/test_exact.py -k "cuda or tables or follow" > $R/pytest_cuda.log 2>&1; tail -1 $R/pytest_cuda.log
timeout 120 python3 bench/bench_variants.py --models opt-1.3b,opt-13b --dtypes float16 > $R/variants.txt 2>&1; grep -E "opt-|1GiB|copy" $R/variants.txt
timeout 200 python3 bench/run_all.py --skip-steps --models opt-1.3b,opt-13b --dtypes float16,bfloat16 --out $R/passes > $R/passes.log 2>&1; grep -A6 "^| model" $R/passes.log | head -8
