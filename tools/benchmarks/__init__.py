"""Speed and memory measurements, one command each, run from the repository root:

    python -m tools.benchmarks.cpu         # DETR on this machine's CPU: inference, training step, matcher, data, ...
    python -m tools.benchmarks.coco_eval   # the COCO evaluation backends side by side
    python -m tools.benchmarks.predict     # python -m tools.predict next to plain loops over model(...)
    python -m tools.benchmarks.recipe      # training compute of each recipe
    python -m tools.benchmarks.segm        # peak memory of mask post-processing

Timings are printed, never asserted: compare the ratios, absolute times depend on the machine and its load.
"""
