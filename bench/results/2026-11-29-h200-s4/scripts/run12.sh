export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r12; mkdir -p $R
timeout 70 python3 -m pytest -q tests/test_noise.py tests/test_kernels.py -k cuda > $R/pytest_cuda.log 2>&1; tail -1 $R/pytest_cuda.log
timeout 50 python3 bench/bench_variants.py --models opt-13b --dtypes float16 > $R/variants.txt 2>&1; grep -E "opt-13b.*RN|1GiB.*RN" $R/variants.txt
