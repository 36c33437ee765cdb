set -x
export FASTMEZO_COMMIT=$1
FASTMEZO_NO_NATIVE=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
R=$OUT/r1; mkdir -p $R
python3 -c "
import sys; sys.path.insert(0, 'tests')
import test_noise as T
for fast in (True, False):
    print('FAST' if fast else 'accurate', 'max |r - r64|, max |r - r64|/(1+r64), worst u:', T.radius_errors('cuda', fast))
" > $R/radius.txt 2>&1; cat $R/radius.txt
timeout 200 python3 -m pytest -q -x tests/test_noise.py tests/test_kernels.py tests/test_rounding.py -k cuda > $R/pytest_cuda.log 2>&1; tail -3 $R/pytest_cuda.log
timeout 150 python3 bench/bench_variants.py --models opt-1.3b,opt-13b --dtypes float16 > $R/variants_newlog.txt 2>&1; tail -14 $R/variants_newlog.txt
timeout 60 ncu --clock-control none -k regex:axpbz --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy python3 .scratch/ncu_pass.py > $R/ncu_newlog.txt 2>&1; grep -E "Duration|Throughput|Executed Ipc|Issue Slots|Executed Instructions |Achieved Occupancy|==PROF==|==ERROR" $R/ncu_newlog.txt | head -40
cp .scratch/philox_old.py kernels/philox.py
timeout 150 python3 bench/bench_variants.py --models opt-1.3b,opt-13b --dtypes float16 > $R/variants_oldlog.txt 2>&1; tail -14 $R/variants_oldlog.txt
timeout 60 ncu --clock-control none -k regex:axpbz --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats --section Occupancy python3 .scratch/ncu_pass.py > $R/ncu_oldlog.txt 2>&1; grep -E "Duration|Executed Instructions |Issue Slots" $R/ncu_oldlog.txt | head -20
cp .scratch/philox_new.py kernels/philox.py
