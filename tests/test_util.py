"""The original's util.misc names that users' scripts import, restored as thin wrappers."""
import builtins

import torch

import util.misc as misc


def test_util_misc_names_of_the_original():
    for name in ("NestedTensor", "nested_tensor_from_tensor_list", "collate_fn", "MetricLogger", "SmoothedValue",
                 "all_gather", "reduce_dict", "get_rank", "get_world_size", "is_main_process", "save_on_master",
                 "setup_for_distributed", "init_distributed_mode", "interpolate", "get_sha", "accuracy",
                 "is_dist_avail_and_initialized"):
        assert hasattr(misc, name), name


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
