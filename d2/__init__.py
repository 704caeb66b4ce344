"""DETR inside Detectron2: a config, a meta-architecture, a dataset mapper, a training script and a checkpoint
converter. Run its scripts from the repository root as modules (``python -m d2.train_net``, ``python -m
d2.converter``), so that this repository's ``models/``, ``util/`` and ``datasets/`` are importable; see
``d2/README.md``."""
