"""DETR inside Detectron2: a config, a meta-architecture, a dataset mapper, a training script and a checkpoint
converter. Run its scripts from the repository root as modules (``python -m d2.train_net``, ``python -m
d2.converter``), or from inside ``d2/`` as the original's (``python train_net.py``, ``python converter.py``, ``import
detr``), which put the repository root on ``sys.path`` for this repository's ``models/`` and ``util/``; see
``d2/README.md``."""
