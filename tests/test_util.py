"""The original's util.misc names that users' scripts import, restored as thin wrappers."""
import builtins
import warnings
from typing import List, Tuple

import pytest
import torch
from torch import Tensor

import util.misc as misc

# the names of the original's util.misc that scripted (its NestedTensor was a TorchScript class; interpolate carried a
# TorchScript type comment)
SCRIPTABLE = ("NestedTensor", "nested_tensor_from_tensor_list", "interpolate")


def test_util_misc_names_of_the_original():
    for name in ("NestedTensor", "nested_tensor_from_tensor_list", "collate_fn", "MetricLogger", "SmoothedValue",
                 "all_gather", "reduce_dict", "get_rank", "get_world_size", "is_main_process", "save_on_master",
                 "setup_for_distributed", "init_distributed_mode", "interpolate", "get_sha", "accuracy",
                 "is_dist_avail_and_initialized"):
        assert hasattr(misc, name), name


def _users_function(images: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """A user's function calling each scriptable name of util.misc."""
    batch = misc.nested_tensor_from_tensor_list(images)
    batch = misc.NestedTensor(batch.tensors * 2, batch.mask).to(torch.device("cpu"))
    tensors, mask = batch.decompose()
    assert mask is not None
    return (misc.interpolate(tensors, size=[16, 12], mode="bilinear", align_corners=False),
            misc.interpolate(mask[:, None].float(), scale_factor=0.5))


@pytest.mark.parametrize("name", SCRIPTABLE)
def test_scriptable_names_of_the_original_script(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in recent torch
        torch.jit.script(getattr(misc, name))


def test_scriptable_names_script_within_a_users_scripted_function():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(_users_function)
    images = [torch.rand(3, 10, 7), torch.rand(3, 6, 9)]
    for eager, script in zip(_users_function(images), scripted(images)):
        assert torch.equal(eager, script)
    resized, mask = scripted(images)
    assert resized.shape == (2, 3, 16, 12) and mask.shape == (2, 1, 5, 4)
    assert mask[1, 0, 4].eq(1).all() and not mask[0].any()  # the second image is padded at the bottom


def test_interpolate_is_torchs_including_empty_batches():
    x = torch.rand(2, 3, 4, 5)
    assert torch.equal(misc.interpolate(x, size=(8, 10), mode="bilinear", align_corners=False),
                       torch.nn.functional.interpolate(x, size=(8, 10), mode="bilinear", align_corners=False))
    assert misc.interpolate(torch.zeros(0, 3, 4, 5), scale_factor=2.0).shape == (0, 3, 8, 10)


def test_metric_logger_meters_by_attribute():
    logger = misc.MetricLogger()
    logger.update(loss=2.0)
    logger.update(loss=4.0)
    assert logger.loss.global_avg == 3.0
    try:
        logger.nope
    except AttributeError as err:
        assert "nope" in str(err)
    else:
        raise AssertionError("a missing meter must raise AttributeError")


def test_get_sha_names_the_revision():
    sha = misc.get_sha()
    assert sha.startswith("sha: ") and ", status: " in sha and ", branch: " in sha


def test_setup_for_distributed_silences_print_on_other_processes(capsys):
    original = builtins.print
    try:
        misc.setup_for_distributed(False)
        print("hidden")
        print("shown", force=True)
        misc.setup_for_distributed(True)
        print("back")
    finally:
        builtins.print = original
    out = capsys.readouterr().out
    assert "hidden" not in out and "shown" in out and "back" in out
