export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r5; mkdir -p $R
timeout 280 python3 bench/run_all.py --skip-steps --models opt-1.3b,opt-13b --dtypes float16,bfloat16 --out $R/passes > $R/passes.log 2>&1; tail -30 $R/passes.log | cut -c1-200
timeout 150 python3 bench/bench_variants.py --models opt-1.3b,opt-13b --dtypes float16 > $R/variants.txt 2>&1; grep -E "opt-|1GiB|copy" $R/variants.txt
