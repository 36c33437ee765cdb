export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r3; mkdir -p $R
timeout 100 python3 .scratch/sr_configs.py > $R/sr_configs.txt 2>&1; cat $R/sr_configs.txt
timeout 150 python3 .scratch/prof_exact.py > $R/prof_exact.txt 2>&1; grep -E "group_bytes|plain forward" $R/prof_exact.txt
for gb in 0 default; do
  if [ $gb = default ]; then X=""; else X="--exact-group-bytes 0"; fi
  timeout 150 python3 bench/run_all.py --skip-passes --models opt-1.3b,opt-13b --dtypes float16 --configs 1x128 --variants inplace-rn,exact-rn $X --out $R/steps-1x128-gb-$gb > $R/steps-1x128-gb-$gb.log 2>&1
  grep -E "overhead / " $R/steps-1x128-gb-$gb.log | cut -c1-150
done
