"""The CUDA path, proven in one run: correctness against the CPU, speed, the synthetic main job and torchrun + NCCL.

    python -m tools.gpu_check                          # everything, on the GPU (planned: 6 minutes on one H200)
    python -m tools.gpu_check --reference ../detr      # also the original facebookresearch/detr's speed, same GPU
    python -m tools.gpu_check --only correctness       # a subset: correctness, speed, jobs, torchrun
    python -m tools.gpu_check --skip_jobs              # without the two synthetic training jobs (the long rows)
    python -m tools.gpu_check --smoke                  # every row tiny, on CPU (or the GPU): the test runs this

Prints one table: section, check, status (ok / FAIL / skipped: reason), measured value(s), and with
``--reference`` the original's numbers beside ours. Exit status 1 when a row of the correctness or torchrun
sections FAILs (speed and job rows report; they do not gate); 0 otherwise. Each section's docstring says what its
rows check:

1. correctness (``correctness.py``, TF32 off): hub models' outputs, a training step's losses and gradients on CUDA
   against the CPU; ``--amp bf16`` / ``fp16`` steps; the fp16 GradScaler's state through a checkpoint.
2. speed (``speed.py``; measured by ``speed_worker.py`` in a process of its own per checkout): R50 inference and
   training, images/s and peak memory, beside the original's with ``--reference``.
3. jobs (``jobs.py``): the synthetic main job's minutes to AP50 >= 0.80 in fp32 and ``--amp bf16``.
4. torchrun (``jobs.py``): one synthetic epoch with NCCL, then ``--eval --resume`` of its checkpoint.

``--smoke`` runs every row tiny (a resnet18 / hidden 32 model instead of R50, 64-pixel images, the jobs cut to one
epoch of 16 images with no AP target, torchrun with gloo on CPU, ``torch.compile`` with its ``eager`` backend) on
CUDA when there is one, else on the CPU, where "cuda vs cpu" rows compare the CPU with itself.

Budget, planned for one H200 with nothing cached and not yet measured there (the first GPU run will tell; the table
ends with each section's seconds): correctness under a minute, speed about 2.5 min (mostly compiling R50 for two
batch sizes), jobs at most --job_cap (100 s) plus about 20 s of data, torchrun about 40 s: about 6 minutes.

Packages the GPU machine may lack: pycocotools (main.py, so the job and torchrun rows, and the original's training
row), hotcoco (faster COCO evaluation; pycocotools is used without it), submitit and panopticapi-lite (no row needs
them; listed in the machine row). A row that needs a missing package says 'skipped: <package> missing'. The GPU
machine has no network: bring them as wheels. On a machine with network and the GPU machine's Python version:

    pip download -d wheels/ --only-binary=:all: "pycocotools>=2.0.7" "hotcoco>=1.1" "submitit>=1.5.4"
    pip download -d wheels/ --no-deps panopticapi-lite==0.2.0

then, with wheels/ copied beside the checkout on the GPU machine:

    pip install --no-index --find-links wheels/ pycocotools hotcoco submitit
    pip install --no-index --find-links wheels/ --no-deps panopticapi-lite
    python -m tools.gpu_check --reference ../detr     # ../detr: a checkout of facebookresearch/detr (optional)
"""
