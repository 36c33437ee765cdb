export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r2; mkdir -p $R
timeout 200 python3 .scratch/sweep.py > $R/sweep.txt 2>&1; cat $R/sweep.txt
timeout 330 python3 bench/run_all.py --skip-passes --models opt-1.3b,opt-13b --dtypes float16 --configs 16x256,1x128 --out $R/steps > $R/steps.log 2>&1; grep -E "overhead / |2 forwards" $R/steps.log | cut -c1-250
