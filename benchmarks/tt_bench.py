"""TT-Rec benchmark on FBTT's setup (same as ``python -m hashemb tt-bench``);
see hashemb/tt_bench.py for what is measured and how flops and bytes count."""
import sys

from hashemb.tt_bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
