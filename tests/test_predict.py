"""The inference command and API (tools.predict, tools.inference): outputs equal PostProcess on the model's
outputs, COCO files that pycocotools reads, and the issue's "errors, not crashes" list."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from datasets.coco_categories import COCO_CATEGORY_NAMES
from datasets.synthetic import generate
from datasets.transforms import make_coco_transforms
from models import build_model
from models.detr import PostProcess
from tools import predict as P
from tools.images import ImageError, read_image
from tools.inference import Predictor, predict, resolve_category_names
from util.nested_tensor import nested_tensor_from_tensor_list

from conftest import tiny_args

NAMES = {1: "ellipse", 2: "rectangle", 3: "triangle"}


def synthetic_args(**overrides):
    """A tiny model on the synthetic recipe's path: spatial prior, positional encoding at the input, layer3, BN."""
    base = dict(spatial_prior=True, pos_at_input=True, backbone_last_layer="layer3", backbone_norm="bn",
                val_size=64, max_size=100, dataset_file="synthetic")
    base.update(overrides)
    return tiny_args(**base)


def save_checkpoint(path: Path, args, seed: int = 0, objects_everywhere: bool = False, **extra_args) -> Path:
    torch.manual_seed(seed)
    model, _, _ = build_model(args)
    if objects_everywhere:  # no query predicts "no object": every one makes a panoptic segment
        with torch.no_grad():
            model.detr.class_embed.bias[-1] = -20
    args_dict = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    args_dict.update(extra_args)
    torch.save({"model": model.state_dict(), "args": args_dict, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "data", seed=3, num_train=4, num_val=4, image_size=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pth", synthetic_args(),
                           category_names=NAMES)


@pytest.fixture(scope="module")
def unnamed_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "unnamed.pth", synthetic_args())


def reference(checkpoint: Path, images: list, threshold: float, batch_size: int = 1) -> list:
    """PostProcess on the model's outputs, computed without tools.inference: load, build, transform, forward."""
    ckpt = torch.load(checkpoint, weights_only=True)
    args = synthetic_args(aux_loss=False)
    model, _, _ = build_model(args)
    model.load_state_dict(ckpt["model"])
    model.eval()
    transform = make_coco_transforms("val", val_size=args.val_size, max_size=args.max_size)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = [PIL.Image.open(p).convert("RGB") for p in images[start:start + batch_size]]
        tensors = [transform(img, None)[0] for img in chunk]
        with torch.no_grad():
            outputs = model(nested_tensor_from_tensor_list(tensors))
        sizes = torch.tensor([[img.height, img.width] for img in chunk])
        for r in PostProcess()(outputs, sizes):
            keep = r["scores"] > threshold
            out.append({k: v[keep] for k, v in r.items()})
    return out


def run_command(*argv) -> dict:
    return P.main([str(a) for a in argv])


def test_command_writes_pngs_and_coco_results_equal_to_postprocess(tmp_path, data, checkpoint):
    images = sorted((data / "val2017").glob("*.jpg"))
    out = tmp_path / "out"
    summary = run_command("--resume", checkpoint, "--images", data / "val2017", "--output_dir", out,
                          "--threshold", 0.9)
    assert summary["images"] == 4 and not summary["skipped"]
    for path in images:
        with PIL.Image.open(out / f"{path.stem}.png") as png:
            assert png.format == "PNG" and min(png.size) >= 64

    gt = COCO(str(data / "annotations" / "instances_val2017.json"))
    detections = gt.loadRes(str(out / "results.json"))  # pycocotools accepts it: ids match the annotation file
    assert set(detections.getImgIds()) <= set(gt.getImgIds())
    header = COCO(str(out / "images.json"))  # and without ground truth, through images.json
    header.loadRes(str(out / "results.json"))
    assert {c["id"]: c["name"] for c in header.dataset["categories"]} == NAMES

    results = json.loads((out / "results.json").read_text())
    expected = reference(checkpoint, images, threshold=0.0)  # every query: --threshold only chooses what is drawn
    assert sum(len(r["scores"]) for r in expected) == len(results) > 0
    for path, ref in zip(images, expected):
        mine = [r for r in results if r["image_id"] == int(path.stem)]
        boxes = torch.tensor([r["bbox"] for r in mine]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        torch.testing.assert_close(boxes, ref["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor([r["score"] for r in mine]), ref["scores"], atol=1e-6, rtol=0)
        assert [r["category_id"] for r in mine] == ref["labels"].tolist()


def test_batches_of_different_sizes_equal_postprocess_of_the_padded_batch(tmp_path, data, checkpoint):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((data / "val2017").glob("*.jpg"))[:3]
    sizes = [(60, 60), (50, 60), (60, 40)]  # (h, w): three different sizes, padded together
    for k, (src, (h, w)) in enumerate(zip(sources, sizes)):
        PIL.Image.open(src).crop((0, 0, w, h)).save(folder / f"{k + 1:03d}.png")
    images = sorted(folder.glob("*.png"))
    predictions = Predictor.from_checkpoint(str(checkpoint), device="cpu")(folder, score_threshold=0.0,
                                                                            batch_size=2)
    expected = reference(checkpoint, images, threshold=0.0, batch_size=2)
    assert [p.size for p in predictions] == sizes
    for pred, ref in zip(predictions, expected):
        torch.testing.assert_close(pred.boxes, ref["boxes"], atol=1e-4, rtol=0)
        assert pred.labels.tolist() == ref["labels"].tolist()
        assert pred.names == [NAMES.get(label, str(label)) for label in ref["labels"].tolist()]


def test_inputs_paths_pil_and_tensors_give_the_same_predictions(data, checkpoint):
    path = sorted((data / "val2017").glob("*.jpg"))[0]
    image = PIL.Image.open(path).convert("RGB")
    as_uint8 = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    predictor = Predictor.from_checkpoint(str(checkpoint), device="cpu")
    preds = predictor([path, image, as_uint8, as_uint8.float() / 255], score_threshold=0.0)
    assert [p.source for p in preds] == [str(path), "<input 1>", "<input 2>", "<input 3>"]
    for p in preds[1:]:
        torch.testing.assert_close(p.boxes, preds[0].boxes)
    with pytest.raises(ImageError, match=r"values in \[0, 1\].*not normalised"):
        predictor([(as_uint8.float() / 255 - 0.45) / 0.22])
    with pytest.raises(ImageError, match=r"\[3, H, W\]"):
        predictor([torch.zeros(64, 64)])


def test_unreadable_images_are_skipped_named_and_the_rest_goes_on(tmp_path, data, checkpoint, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((data / "val2017").glob("*.jpg"))[0]
    (folder / "a_good.jpg").write_bytes(good.read_bytes())
    (folder / "b_truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "c_not_an_image.jpg").write_text("hello")
    (folder / "notes.txt").write_text("not read")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        summary = run_command("--resume", checkpoint, "--images", folder, "--output_dir", out)
    assert summary["images"] == 1
    assert [Path(s).name for s, _ in summary["skipped"]] == ["b_truncated.jpg", "c_not_an_image.jpg"]
    assert "b_truncated.jpg" in caplog.text and "c_not_an_image.jpg" in caplog.text
    assert "notes.txt" in caplog.text  # not an image by its extension: said, not silently dropped
    images = json.loads((out / "images.json").read_text())["images"]
    assert [i["file_name"] for i in images] == ["a_good.jpg"]
    assert (out / "a_good.png").is_file() and not (out / "b_truncated.png").exists()


def test_empty_folder_and_missing_path_are_clear_errors(tmp_path, checkpoint, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        run_command("--resume", checkpoint, "--images", empty, "--output_dir", tmp_path / "out")
    assert f"folder {empty} holds no image files" in caplog.text
    with pytest.raises(SystemExit):
        run_command("--resume", checkpoint, "--images", tmp_path / "nope.jpg", "--output_dir", tmp_path / "out")
    assert "nope.jpg: no such file or folder" in caplog.text
    assert not (tmp_path / "out").exists()


def test_existing_results_are_not_overwritten_without_overwrite(tmp_path, data, checkpoint, caplog):
    out = tmp_path / "out"
    args = ["--resume", checkpoint, "--images", data / "val2017", "--output_dir", out, "--no_draw"]
    run_command(*args)
    before = (out / "results.json").read_text()
    (out / "results.json").write_text("[]")
    with pytest.raises(SystemExit):
        run_command(*args, "--threshold", 0.0)
    assert f"{out / 'results.json'} exists" in caplog.text and "--overwrite" in caplog.text
    assert (out / "results.json").read_text() == "[]"
    run_command(*args, "--overwrite")
    assert (out / "results.json").read_text() == before


def test_checkpoint_without_names_gives_numeric_labels_said_once(tmp_path, data, unnamed_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        preds = Predictor.from_checkpoint(str(unnamed_checkpoint), device="cpu")(data / "val2017",
                                                                                  score_threshold=0.0)
    assert sum(len(p.names) for p in preds) > 0
    assert all(p.names == [str(label) for label in p.labels.tolist()] for p in preds)
    assert caplog.text.count("category names unknown") == 1
    # names given by the caller win; 'coco' is COCO's
    coco = Predictor.from_checkpoint(str(unnamed_checkpoint), device="cpu", category_names="coco")
    assert coco.category_names[1] == "person" and coco.category_names[90] == "toothbrush"


def test_category_names_from_a_coco_annotation_file(data, unnamed_checkpoint):
    ann = data / "annotations" / "instances_val2017.json"
    predictor = Predictor.from_checkpoint(str(unnamed_checkpoint), device="cpu", category_names=str(ann))
    assert predictor.category_names == NAMES
    with pytest.raises(ValueError, match="expected 'coco', 'coco_panoptic' or a JSON file"):
        resolve_category_names("no-such-file.json")


def _save(array: np.ndarray, path: Path, mode=None) -> Path:
    PIL.Image.fromarray(array, mode=mode).save(path)
    return path


def test_grayscale_rgba_palette_and_16_bit_images_are_converted(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    gray = _save(rgb[..., 0], tmp_path / "gray.png")
    rgba = _save(np.dstack([rgb, np.full((20, 30), 7, np.uint8)]), tmp_path / "rgba.png")
    palette = tmp_path / "palette.png"
    PIL.Image.fromarray(rgb).convert("P").save(palette, transparency=0)
    sixteen = tmp_path / "sixteen.png"
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(5, axis=0)
    PIL.Image.fromarray(values).save(sixteen)
    cmyk = tmp_path / "cmyk.jpg"
    PIL.Image.fromarray(rgb).convert("CMYK").save(cmyk)

    assert PIL.Image.open(sixteen).mode.startswith("I")  # the case PIL's own convert('RGB') would clip
    for path in (gray, rgba, palette, sixteen, cmyk):
        image = read_image(path)
        assert image.mode == "RGB" and image.size == PIL.Image.open(path).size, path
    assert np.array_equal(np.asarray(read_image(gray))[..., 1], rgb[..., 0])
    assert np.array_equal(np.asarray(read_image(rgba)), rgb)  # alpha dropped, colours kept
    assert np.asarray(read_image(sixteen))[0, :, 0].tolist() == [0, 1, 128, 255]  # 16 bits scaled, not clipped


def test_huge_image_is_resized_as_evaluation_and_bombs_are_skipped(tmp_path, checkpoint, monkeypatch):
    big = _save(np.full((1500, 2400, 3), 90, np.uint8), tmp_path / "big.png")
    predictor = Predictor.from_checkpoint(str(checkpoint), device="cpu")  # val_size 64, max_size 100
    pred = predictor(big, score_threshold=0.0)[0]
    # short side round(100 * 1500 / 2400) = 62 so that the long side stays within max_size, long side int(62 * 1.6)
    assert pred.size == (1500, 2400) and pred.input_size == (62, 99)
    # boxes in the pixels of the image as given (PostProcess with its size), not of the resized one
    torch.testing.assert_close(pred.boxes, reference(checkpoint, [big], threshold=0.0)[0]["boxes"], atol=1e-2, rtol=0)
    assert float(pred.boxes[:, 2:].max()) > 500
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this
    skipped = []
    assert predictor(big, skipped=skipped) == []
    assert "big.png" in skipped[0][0] and "MAX_IMAGE_PIXELS" in skipped[0][1]


def test_amp_bf16_runs_the_forward_under_autocast(data, checkpoint):
    image = sorted((data / "val2017").glob("*.jpg"))[0]
    fp32 = Predictor.from_checkpoint(str(checkpoint), device="cpu")(image, score_threshold=0.0)[0]
    bf16 = Predictor.from_checkpoint(str(checkpoint), device="cpu", amp="bf16")(image, score_threshold=0.0)[0]
    assert bf16.boxes.dtype == torch.float32
    assert not torch.equal(bf16.boxes, fp32.boxes)  # another precision did run
    torch.testing.assert_close(bf16.boxes, fp32.boxes, atol=4.0, rtol=0)  # pixels of a 64-pixel image
    with pytest.raises(ValueError, match="amp must be one of"):
        Predictor.from_checkpoint(str(checkpoint), device="cpu", amp="fp8")


def test_segmentation_model_gives_masks_and_panoptic_files(tmp_path, data):
    names = {**NAMES, 4: "sky", 5: "ground"}
    # the mask head needs hidden_dim + nheads divisible by 8
    args = synthetic_args(masks=True, num_classes=6, hidden_dim=128, nheads=8,
                          dataset_file="synthetic_panoptic")
    ckpt = save_checkpoint(tmp_path / "segm.pth", args, category_names=names, thing_ids=[1, 2, 3],
                           objects_everywhere=True)
    out = tmp_path / "out"
    run_command("--resume", ckpt, "--images", data / "val2017", "--output_dir", out, "--threshold", 0.1,
                "--panoptic_threshold", 0.0)
    gt = COCO(str(data / "annotations" / "instances_val2017.json"))
    results = json.loads((out / "results.json").read_text())
    assert results and not any("segmentation" in r for r in results)
    gt.loadRes(str(out / "results.json"))  # boxes
    segm = json.loads((out / "results_segm.json").read_text())
    assert len(segm) == len(results) and all("segmentation" in r and "bbox" not in r for r in segm)
    gt.loadRes(str(out / "results_segm.json"))  # RLE masks, their areas from the masks

    panoptic = json.loads((out / "panoptic.json").read_text())
    assert len(panoptic["annotations"]) == 4
    assert {c["id"]: c["isthing"] for c in panoptic["categories"]} == {1: 1, 2: 1, 3: 1, 4: 0, 5: 0}
    for ann in panoptic["annotations"]:
        png = np.asarray(PIL.Image.open(out / "panoptic" / ann["file_name"]).convert("RGB")).astype(np.int64)
        ids = set(np.unique(png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]).tolist())
        assert ann["segments_info"] and ids == {s["id"] for s in ann["segments_info"]}

    pred = Predictor.from_checkpoint(str(ckpt), device="cpu", panoptic_threshold=0.0)(
        sorted((data / "val2017").glob("*.jpg"))[0], score_threshold=0.1)[0]
    assert pred.masks.shape == (len(pred.scores),) + pred.size and pred.masks.dtype == torch.bool
    assert pred.panoptic["segmentation"].shape == pred.size
    assert all(s["name"] == names[s["category_id"]] for s in pred.panoptic["segments_info"])


def test_hub_models_are_labelled_with_coco_names(data):
    image = sorted((data / "val2017").glob("*.jpg"))[0]
    predictor = Predictor.from_hub("detr_resnet50", pretrained=False, device="cpu", val_size=64, max_size=100)
    assert predictor.category_names[18] == "dog"
    pred = predictor(image, score_threshold=0.0)[0]
    assert len(pred.names) == 100 and all(n == COCO_CATEGORY_NAMES.get(int(label), str(int(label)))
                                          for n, label in zip(pred.names, pred.labels))
    # a bare model (e.g. from torch.hub.load): the caller says what its classes are
    again = predict(predictor.model, image, score_threshold=0.0, category_names="coco", val_size=64, max_size=100)
    assert again[0].names == pred.names
    assert predict(predictor.model, image, score_threshold=0.0, val_size=64, max_size=100)[0].names == [
        str(int(label)) for label in pred.labels]
    with pytest.raises(ValueError, match="unknown hub model"):
        Predictor.from_hub("detr_resnet18")


def test_published_checkpoint_gets_coco_names_and_its_class_count(tmp_path, data):
    """A checkpoint shaped like the original's (argparse.Namespace args without num_classes), under its published
    file name: the class count comes from its class head, the names are COCO's."""
    import argparse

    import hubconf

    torch.manual_seed(0)
    path = tmp_path / "detr-r50-e632da11.pth"
    torch.save({"model": hubconf.detr_resnet50().state_dict(),
                "args": argparse.Namespace(backbone="resnet50", dataset_file="coco", masks=False, lr=1e-4)}, path)
    predictor = Predictor.from_checkpoint(str(path), device="cpu", val_size=64, max_size=100)
    assert predictor.model.class_embed.out_features == 92
    assert predictor.category_names == COCO_CATEGORY_NAMES
    pred = predictor(sorted((data / "val2017").glob("*.jpg"))[0], score_threshold=0.0)[0]
    assert len(pred.names) == 100


def test_progress_bar_on_folders(data, checkpoint, capsys, tmp_path):
    """A bar on stderr counting every image of the folder, unreadable ones included; none when off or for one
    image; the predictions are the same with it."""
    import shutil

    folder = Path(shutil.copytree(data / "val2017", tmp_path / "images"))  # 4 images
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    predictor = Predictor.from_checkpoint(str(checkpoint), device="cpu")
    capsys.readouterr()
    quiet = predictor(folder, score_threshold=0.0, batch_size=2)
    assert "/5" not in capsys.readouterr().err
    skipped = []
    shown = predictor(folder, score_threshold=0.0, batch_size=2, progress=True, skipped=skipped)
    err = capsys.readouterr().err
    assert "0/5" in err and "5/5" in err and "img" in err  # drawn at the start, closed full
    assert len(skipped) == 1 and len(shown) == 4
    assert [p.source for p in shown] == [p.source for p in quiet]
    assert all(torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) for a, b in zip(shown, quiet))
    predictor(sorted(folder.glob("*.jpg"))[0], progress=True)
    assert "/1" not in capsys.readouterr().err  # no bar for a single image


def test_output_names_and_image_ids():
    assert P.output_names(["a/x.jpg", "b/x.png", "c/y.jpg"]) == ["a_x", "b_x", "y"]
    assert P.output_names(["a/x.jpg", "a/x.png"]) == ["a_x", "a_x_2"]
    assert P.image_ids(["d/000000000139.jpg", "d/42.png"]) == [139, 42]
    assert P.image_ids(["d/139.jpg", "e/139.png"]) == [1, 2]  # numbers, but not distinct
    assert P.image_ids(["cat.jpg", "42.jpg"]) == [1, 2]


def _pycocotools_stats(annotation_file: Path, results_file: Path, iou_type: str) -> list:
    """The 12 numbers of pycocotools' COCOeval on a results file, as a user evaluates the command's output."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats.tolist()


def _ground_truth_from_masks(data: Path, segm_results: list, root: Path) -> Path:
    """A copy of ``data`` whose validation annotations are rectangles around each image's two best-scoring
    predicted masks: a random mask model then scores above zero (its masks cover most of these rectangles), and
    its masks' areas (medium) differ from its boxes' (small), so taking a mask's area from its box would show."""
    shutil.copytree(data, root)
    path = root / "annotations" / "instances_val2017.json"
    instances = json.loads(path.read_text())
    known = {c["id"] for c in instances["categories"]}
    annotations = []
    for image in instances["images"]:
        mine = sorted((r for r in segm_results if r["image_id"] == image["id"] and r["category_id"] in known),
                      key=lambda r: -r["score"])
        for r in mine[:2]:
            x, y, w, h = mask_util.toBbox(r["segmentation"]).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": r["category_id"],
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "area": w * h,
                                "bbox": [x, y, w, h], "iscrowd": 0})
    instances["annotations"] = annotations
    path.write_text(json.dumps(instances))
    return root


@pytest.mark.parametrize("masks", [False, True], ids=["boxes", "masks"])
def test_results_evaluate_to_the_numbers_of_main_eval(tmp_path, data, masks):
    # the command's results.json (and results_segm.json for a mask model), evaluated with pycocotools against the
    # annotations, give main.py --eval's 12 numbers: every query (not only those drawn above --threshold), and the
    # mask results without boxes (so that loadRes takes the areas from the masks, as the evaluation's)
    import main as detr_main
    from util.args import apply_dataset_recipe
    from util.checkpoint import save_checkpoint as save_plain

    # the same image size for both: main.py's --val_size / --max_size, which predict reads from the checkpoint
    argv = ["--dataset_file", "synthetic", "--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none",
            "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64", "--num_queries", "100",
            "--num_classes", "4", "--val_size", "64", "--max_size", "100", "--batch_size", "1", "--num_workers", "0",
            "--coco_eval_backend", "pycocotools"]
    argv += ["--masks", "--hidden_dim", "128", "--nheads", "8"] if masks else ["--hidden_dim", "32", "--nheads", "4"]
    args = detr_main.parse_args(argv + ["--coco_path", str(data)])
    apply_dataset_recipe(args)
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    ckpt = tmp_path / "checkpoint.pth"
    save_plain({"model": model.state_dict(), "args": dict(vars(args))}, str(ckpt))

    out = tmp_path / "out"
    run_command("--resume", ckpt, "--images", data / "val2017", "--output_dir", out, "--no_draw")  # --threshold 0.7
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 4 * 100 and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    if masks:
        segm = json.loads((out / "results_segm.json").read_text())
        assert len(segm) == 4 * 100 and all(set(r) == {"image_id", "category_id", "segmentation", "score"}
                                            for r in segm)
        data = _ground_truth_from_masks(data, segm, tmp_path / "data")
    else:
        assert not (out / "results_segm.json").exists()

    stats = detr_main.main(detr_main.parse_args(argv + ["--coco_path", str(data), "--eval", "--resume", str(ckpt)]))
    annotations = data / "annotations" / "instances_val2017.json"
    assert _pycocotools_stats(annotations, out / "results.json", "bbox") == stats["coco_eval_bbox"]
    if not masks:
        assert max(stats["coco_eval_bbox"]) > 0  # the numbers compared are not all zero
    else:
        assert min(stats["coco_eval_masks"][:3]) > 0
        assert _pycocotools_stats(annotations, out / "results_segm.json", "segm") == stats["coco_eval_masks"]
