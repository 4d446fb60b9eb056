"""Demo only: the synthetic shop (``seed``) and shoppers who come back and buy (``returns``).

Nothing in the pipeline imports this package; ``mailflow demo``, ``mailflow seed``, the
tests and the benchmarks do.
"""
