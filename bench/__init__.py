"""distilflow's benchmark harness (issue 6): speed, size, quality and overhead as ratios.

`python -m bench` (or `make bench`) runs every benchmark family and writes
`bench/results/<date>-<host>.json` and `.md`. Each comparison is measured
side by side in one process or one run, so the machine's noise cancels out
in the ratios; timings are medians over repeats after warm-up, with min and
max, the thread count and the machine recorded.
"""
