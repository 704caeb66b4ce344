"""util.plot_utils: PNGs from real-format log.txt files and saved COCOeval.eval dicts."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.plot_utils import ewm_mean, plot_logs, plot_precision_recall

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_log(folder, epochs=4):
    """A log.txt written by main.py's own writer: train and test metrics of every epoch (main.py evaluates after
    each one)."""
    from main import write_epoch_outputs

    folder.mkdir(parents=True, exist_ok=True)
    for epoch in range(epochs):
        row = {"train_lr": 1e-4, "train_loss": 10.0 / (epoch + 1), "train_class_error": 50.0 - epoch,
               "train_loss_bbox_unscaled": 0.3 - 0.01 * epoch,
               "test_loss": 9.0 / (epoch + 1), "test_class_error": 40.0 - epoch, "test_loss_bbox_unscaled": 0.25,
               "test_coco_eval_bbox": [0.1 * epoch, 0.2 * epoch] + [0.0] * 10,
               "epoch": epoch, "n_parameters": 41000000, "elapsed_s": 60.0 * (epoch + 1)}
        write_epoch_outputs(folder, row, None, epoch)
    return folder


def test_plot_logs_writes_png(tmp_path):
    run1, run2 = _write_log(tmp_path / "run1"), _write_log(tmp_path / "run2", epochs=6)
    fig, axs, png = plot_logs([run1, run2], output=tmp_path / "logs.png")
    assert png == tmp_path / "logs.png" and png.read_bytes().startswith(PNG_MAGIC)
    assert [ax.get_title() for ax in axs] == ["class_error", "loss_bbox_unscaled", "mAP"]
    # mAP is AP@[.50:.95], element 0 of test_coco_eval_bbox, one point per epoch of each run
    for line, epochs in zip(axs[2].get_lines(), (4, 6)):
        x, y = line.get_data()
        assert list(x) == list(range(epochs)) and np.allclose(y, [0.1 * e for e in range(epochs)])
    # a train (solid) and a test (dashed) curve for each run, with the logged values
    lines = axs[0].get_lines()
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-", "--"]
    assert np.allclose(lines[2].get_data()[1], [50.0 - e for e in range(6)])
    assert np.allclose(lines[3].get_data()[1], [40.0 - e for e in range(6)])


def test_plot_logs_skips_epochs_without_evaluation(tmp_path):
    """--eval_every 2: the lines of epochs 0 and 2 have no test_* keys; the test curves join the evaluated epochs."""
    from main import write_epoch_outputs

    run = tmp_path / "run"
    run.mkdir()
    for epoch in range(4):
        row = {"train_class_error": 50.0 - epoch, "train_loss": 5.0 - epoch, "epoch": epoch}
        if epoch % 2:
            row.update(test_class_error=40.0 - epoch, test_loss=4.0 - epoch,
                       test_coco_eval_bbox=[0.1 * epoch] + [0.0] * 11)
        write_epoch_outputs(run, row, None, epoch)
    _, axs, png = plot_logs(run, fields=("class_error", "loss", "mAP"), ewm_col=1)
    assert png.is_file()
    for ax, train, test in ((axs[0], 50.0, 40.0), (axs[1], 5.0, 4.0)):
        (x_train, y_train), (x_test, y_test) = (line.get_data() for line in ax.get_lines())
        assert list(x_train) == [0, 1, 2, 3] and np.allclose(y_train, ewm_mean(train - np.arange(4.0), 1))
        assert list(x_test) == [1, 3] and np.allclose(y_test, ewm_mean(np.array([test - 1, test - 3]), 1))
    x, y = axs[2].get_lines()[0].get_data()
    assert list(x) == [1, 3] and np.allclose(y, ewm_mean(np.array([0.1, 0.3]), 1))


def test_plot_logs_single_folder_default_output_and_fields(tmp_path):
    run = _write_log(tmp_path / "run")
    fig, axs, png = plot_logs(run, fields=("loss", "AP50"), ewm_col=1)
    assert png == run / "plot_logs.png" and png.is_file()
    _, y = axs[1].get_lines()[0].get_data()
    assert np.allclose(y, ewm_mean(np.array([0.0, 0.2, 0.4, 0.6]), 1))


def test_plot_logs_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope not found: expected a run's folder .* or a log file"):
        plot_logs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="log.txt not found"):
        plot_logs(tmp_path / "empty")


def test_plot_logs_takes_the_log_file_itself(tmp_path):
    run = _write_log(tmp_path / "run")
    fig, axs, png = plot_logs(run / "log.txt")
    assert png == run / "plot_logs.png" and png.is_file()
    assert [t.get_text() for t in axs[0].get_legend().get_texts()] == ["run", "run (test)"]


def test_ewm_mean_matches_definition():
    values = np.array([1.0, 2.0, 4.0])
    assert np.allclose(ewm_mean(values, 0), values)
    alpha = 0.5  # com=1
    w = np.array([(1 - alpha) ** 2, 1 - alpha, 1.0])
    assert np.isclose(ewm_mean(values, 1)[-1], (w * values).sum() / w.sum())


def _coco_eval_dict(tmp_path):
    gt = {"images": [{"id": i, "width": 50, "height": 50, "file_name": f"{i}.jpg"} for i in (1, 2)],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400.0},
              {"id": 2, "image_id": 2, "category_id": 2, "bbox": [10, 10, 30, 15], "area": 450.0}],
          # category 'c' has no ground truth: precision -1 in COCOeval
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    for ann in gt["annotations"]:
        ann["iscrowd"] = 0
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        dets = coco.loadRes([{"image_id": 1, "category_id": 1, "bbox": [6, 5, 20, 20], "score": 0.9},
                             {"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.8},
                             {"image_id": 2, "category_id": 2, "bbox": [10, 11, 30, 15], "score": 0.4}])
        coco_eval = COCOeval(coco, dets, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval.eval


def test_plot_precision_recall_from_saved_eval(tmp_path, capsys):
    run = tmp_path / "exp7" / "eval"
    run.mkdir(parents=True)
    torch.save(_coco_eval_dict(tmp_path), run / "latest.pth")  # as main.py saves coco_eval['bbox'].eval
    fig, axs, png = plot_precision_recall([run / "latest.pth"], naming_scheme="exp_id")
    assert png == run / "precision_recall.png" and png.read_bytes().startswith(PNG_MAGIC)
    x, y = axs[0].get_lines()[0].get_data()
    assert len(x) == 101 and np.all((y >= 0) & (y <= 1))  # the -1 of category 'c' is left out
    assert "exp_id exp7: mAP@50=" in capsys.readouterr().out
    assert axs[0].get_legend().get_texts()[0].get_text() == "exp7"


def test_plot_precision_recall_plain_types(tmp_path):
    # plain tensors and a params dict, loadable with weights_only=True
    raw = _coco_eval_dict(tmp_path)
    plain = {k: torch.as_tensor(v) for k, v in raw.items() if k in ("precision", "recall", "scores")}
    plain["params"] = {"recThrs": raw["params"].recThrs.tolist()}
    torch.save(plain, tmp_path / "plain.pth")
    torch.save(raw, tmp_path / "raw.pth")
    _, axs, _ = plot_precision_recall([tmp_path / "plain.pth", tmp_path / "raw.pth"])
    (x0, y0), (x1, y1) = (line.get_data() for line in axs[0].get_lines())
    assert np.allclose(x0, x1) and np.allclose(y0, y1)


def test_plot_precision_recall_minimal_dict(tmp_path):
    precision = torch.rand(10, 101, 3, 4, 3)
    torch.save({"precision": precision}, tmp_path / "e.pth")
    _, axs, png = plot_precision_recall(tmp_path / "e.pth", output=tmp_path / "pr.png")
    assert png.is_file()
    _, y = axs[0].get_lines()[0].get_data()
    assert np.allclose(y, precision[0, :, :, 0, -1].double().mean(1).numpy())
    with pytest.raises(ValueError, match="naming_scheme"):
        plot_precision_recall(tmp_path / "e.pth", naming_scheme="bad")
