"""The sections of ``benchmarks/kernels.py``: :mod:`.common` (run state, timing, table rows),
:mod:`.checks` (correctness on CUDA), :mod:`.speed` (kernel rows), :mod:`.decode` (decode proxy
and end to end). ``kernels.py`` puts this directory on ``sys.path`` and runs them."""
