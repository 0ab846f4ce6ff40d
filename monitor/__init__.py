"""InferWatch: a streaming runtime security monitor for deployed ML models."""

import os

# The detectors multiply small matrices (a batch's rows by 64 x 8 components): a threaded BLAS gains
# nothing there and its spinning threads took the cores the detect loop and the consumer process
# need (the detect stage ran at 60% of its single-threaded speed). Set before numpy is imported;
# an operator's own setting wins.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

__version__ = "0.1.0"
