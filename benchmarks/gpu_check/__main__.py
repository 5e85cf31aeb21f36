"""python -m benchmarks.gpu_check --out DIR [--smoke]: the GPU check (its driver: benchmarks/gpu_check/driver.py)."""

import sys

from benchmarks.gpu_check.driver import main

if __name__ == "__main__":
    sys.exit(main())
