"""The prunefx benchmark suite: ``python -m benchmarks`` (or ``make bench``) writes
``docs/performance.md`` and ``docs/img/perf_*.png``.

    common.py               timing, medians, the apply_mask equivalence check, tables, machine
    reconfigure_latency.py  1. trace+analysis+reconfigure vs Torch-Pruning
    scaling.py              1b. prunefx time vs fx graph size
    profile_stages.py       1c. prunefx time per pipeline stage (trace and reconfigure)
    export_frontend.py      1d. the export front-end: prunefx analysis vs torch.export capture (tiny Llama)
    budget.py               1e. masks by cost: to_budget's time and how close it lands (ViT-B/16, ResNet-50)
    training.py             2. training step time vs the FLOPs limit, memory, round_to=8
    onnx_latency.py         3. ONNX Runtime latency dense vs reconfigured
    communication.py        4. gradient bytes all-reduced per DDP step
    report.py               the markdown page and the plots
    run_all.py              the command that runs them all (``--quick`` for CI)
"""
