"""VQ4DiT calibration quality on a seeded toy DiT stack: block-output MSE of k-means alone vs calibrated, with bits
per weight, for 2-bit (k=256, d=4: n=2 candidates, assignments only, n=3) and 3-bit (k=64, d=2):
`python bench/bench_vq_calibration.py [--json PATH]`. Prints the markdown table of docs/performance.md."""
from blockops.bench.vq_calibration import main

if __name__ == "__main__":
    main()
