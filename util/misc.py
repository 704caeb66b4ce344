"""Compatibility names of the original ``util/misc.py``.

The original module mixed tensors, meters and distributed helpers; they now live in topic modules and are
re-exported here so that users' scripts importing ``util.misc`` keep working.
"""
from util.dist import (  # noqa: F401
    all_gather,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_dist_avail_and_initialized,
    is_main_process,
    reduce_dict,
    save_on_master,
)
from util.git import get_sha  # noqa: F401
from util.logger import MetricLogger, SmoothedValue, setup_for_distributed  # noqa: F401
from util.metrics import accuracy  # noqa: F401
from util.nested_tensor import NestedTensor, collate_fn, interpolate, nested_tensor_from_tensor_list  # noqa: F401
