"""normkernels microbenchmarks: ours against torch eager, torch.compile and installed peers.

    python -m bench                       # the full CPU suite: table, JSON, markdown and a plot
    python -m bench --quick --filter layer_norm --dtype bfloat16
    pytest bench --benchmark-only         # the same cases through pytest-benchmark
"""
