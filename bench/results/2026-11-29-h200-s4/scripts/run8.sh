export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r8; mkdir -p $R
timeout 200 python3 bench/run_all.py --skip-passes --models opt-1.3b --dtypes float16 --configs 16x256,1x128 --step-reps 15 --out $R/steps > $R/steps.log 2>&1; grep -E "overhead / |inplace" $R/steps.log | cut -c1-175
timeout 150 python3 bench/run_all.py --skip-passes --models opt-1.3b --dtypes float16 --configs 16x256,1x128 --step-reps 15 --variants inplace-rn,exact-rn --exact-group-bytes 0 --out $R/steps-per-module > $R/steps-per-module.log 2>&1; grep -E "overhead / |inplace" $R/steps-per-module.log | cut -c1-175
