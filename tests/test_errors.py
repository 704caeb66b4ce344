"""Expected user errors end in one clear message (``error: ...`` on stderr, exit status 1), not a traceback; their
messages say what is wrong and what to do."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from util.checkpoint import load_checkpoint
from util.errors import UserError, UserFileNotFoundError, message_of

REPO = Path(__file__).resolve().parents[1]


def _main_py(*argv, debug=False):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("DETR_DEBUG", None)
    if debug:
        env["DETR_DEBUG"] = "1"
    return subprocess.run([sys.executable, "main.py", "--device", "cpu", "--num_workers", "0", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_a_missing_checkpoint_is_one_line(tmp_path):
    missing = tmp_path / "nope.pth"
    result = _main_py("--dataset_file", "synthetic", "--coco_path", str(tmp_path), "--eval", "--resume", str(missing))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 3, result.stderr
    assert lines[-1] == f"error: checkpoint {str(missing)!r} does not exist"
    assert "Traceback" not in result.stderr


def test_a_bad_coco_path_is_one_line_and_debug_keeps_the_traceback(tmp_path):
    missing = tmp_path / "no_coco"
    result = _main_py("--coco_path", str(missing), "--eval", "--backbone", "resnet18", "--backbone_weights", "none")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 3, result.stderr
    assert lines[-1] == f"error: COCO folder {missing} (--coco_path) not found"
    debug = _main_py("--coco_path", str(missing), "--eval", "--backbone", "resnet18", "--backbone_weights", "none",
                     debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserFileNotFoundError" in debug.stderr


def test_user_errors_are_the_builtin_types_callers_expect():
    err = UserFileNotFoundError("image file x.jpg not found")
    assert isinstance(err, FileNotFoundError) and isinstance(err, UserError)
    # re-raised from a DataLoader worker, the message is the worker's traceback: the original message is kept
    from torch._utils import ExceptionWrapper

    try:
        raise UserFileNotFoundError("image file data/val2017/1.jpg (image_id 1, from ann.json) not found")
    except UserFileNotFoundError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserFileNotFoundError) as reraised:
        wrapped.reraise()
    assert message_of(reraised.value) == "image file data/val2017/1.jpg (image_id 1, from ann.json) not found"


def test_resume_of_a_folder_says_it_is_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(str(tmp_path))
    assert str(err.value) == f"checkpoint {str(tmp_path)!r} is a folder, not a checkpoint file"
    torch.save({"model": {}}, tmp_path / "checkpoint.pth")
    with pytest.raises(FileNotFoundError, match=f"is a folder, not a checkpoint file; did you mean "
                                                f"{tmp_path / 'checkpoint.pth'}\\?"):
        load_checkpoint(str(tmp_path))


class NotAllowed:
    pass


def test_a_file_that_is_not_a_weights_only_checkpoint_is_named_without_unsafe_advice(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {}, "extra": NotAllowed()}, path)
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(str(path))
    message = str(err.value)
    assert message.startswith(f"checkpoint {str(path)!r} could not be read: it is not a checkpoint readable with "
                              f"torch.load(weights_only=True)")
    assert "NotAllowed" in message  # what it holds that is not allowed
    assert "weights_only=False" not in message and "issue" not in message.lower()
