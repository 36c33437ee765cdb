export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r6; mkdir -p $R
timeout 150 python3 -m pytest -q tests/test_noise.py tests/test_kernels.py tests/test_rounding.py tests/test_exact.py -k "cuda or tables" > $R/pytest_cuda.log 2>&1; tail -2 $R/pytest_cuda.log
timeout 120 python3 bench/bench_variants.py --models opt-13b --dtypes float16,bfloat16 > $R/variants_loadfirst.txt 2>&1; grep -E "opt-|1GiB|copy" $R/variants_loadfirst.txt
timeout 60 ncu --clock-control none -k regex:axpbz --section SpeedOfLight --section InstructionStats --section Occupancy --section LaunchStats python3 .scratch/ncu_pass.py > $R/ncu_loadfirst.txt 2>&1; grep -E "Duration|DRAM Throughput|Issue Slots Busy|Registers Per|Achieved Occ" $R/ncu_loadfirst.txt | head -20
cp .scratch/axpbz_old.py kernels/axpbz.py
timeout 120 python3 bench/bench_variants.py --models opt-13b --dtypes float16,bfloat16 > $R/variants_loadlast.txt 2>&1; grep -E "opt-|1GiB|copy" $R/variants_loadlast.txt
timeout 60 ncu --clock-control none -k regex:axpbz --section LaunchStats --section Occupancy python3 .scratch/ncu_pass.py > $R/ncu_loadlast.txt 2>&1; grep -E "Registers Per|Achieved Occ" $R/ncu_loadlast.txt | head -4
cp .scratch/axpbz_new.py kernels/axpbz.py
