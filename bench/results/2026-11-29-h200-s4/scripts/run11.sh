R=$OUT/r11; mkdir -p $R
timeout 60 python3 bench/bench_variants.py --models opt-13b --dtypes float16 > $R/variants_8eb0d56.txt 2>&1; grep -E "opt-13b.*RN|1GiB.*RN" $R/variants_8eb0d56.txt
cp .scratch/axpbz_f74.py kernels/axpbz.py
timeout 60 python3 bench/bench_variants.py --models opt-13b --dtypes float16 > $R/variants_f74a371.txt 2>&1; grep -E "opt-13b.*RN|1GiB.*RN" $R/variants_f74a371.txt
cp .scratch/axpbz_cur.py kernels/axpbz.py
