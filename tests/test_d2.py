"""d2/: DETR inside a real Detectron2 (CPU, offline). Detectron2 is not a dependency of the main suite: these
tests skip without it, and .ci/d2-tests builds it into its own virtualenv and runs them there."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (.ci/d2-tests builds it in its own venv)")

from conftest import GOLDEN_DIR, make_args  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import load_coco_json, register_coco_panoptic  # noqa: E402
from detectron2.data.transforms import ResizeShortestEdge  # noqa: E402
from detectron2.modeling import build_model as d2_build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from d2 import converter  # noqa: E402
from d2.detr import DetrDatasetMapper, add_detr_config  # noqa: E402
from d2.detr.config import MAIN_PY_FLAGS, NOT_IN_CONFIG  # noqa: E402
from datasets import build_dataset, synthetic  # noqa: E402
from models import build_model  # noqa: E402
from util.args import get_args_parser  # noqa: E402
from util.nested_tensor import collate_fn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DET_CONFIG = REPO / "d2" / "configs" / "detr_256_6_6_torchvision.yaml"
SEGM_CONFIG = REPO / "d2" / "configs" / "detr_segm_256_6_6_torchvision.yaml"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

# One small DETR, as main.py flags and as the same model's Detectron2 config keys.
TINY = dict(hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=30, dropout=0.0)
TINY_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.DETR.HIDDEN_DIM", "64", "MODEL.DETR.NHEADS", "4",
             "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2", "MODEL.DETR.DIM_FEEDFORWARD", "64",
             "MODEL.DETR.NUM_OBJECT_QUERIES", "30", "MODEL.DETR.DROPOUT", "0.0"]
# the mask head's group norms need hidden_dim >= 128 and (hidden_dim + nheads) divisible by 8
TINY_SEGM = {**TINY, "hidden_dim": 128, "nheads": 8}
TINY_SEGM_OPTS = [*TINY_OPTS, "MODEL.DETR.HIDDEN_DIM", "128", "MODEL.DETR.NHEADS", "8"]
R18_OPTS = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


def d2_cfg(config: Path, opts: list):
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def torchvision_input(image: torch.Tensor) -> torch.Tensor:
    """main.py's ToTensor + Normalize of a uint8 [3, H, W] image."""
    return (image.float() / 255 - IMAGENET_MEAN) / IMAGENET_STD


def run(cmd: list, cwd: Path = REPO, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("d2") / "synthetic", seed=0, num_train=8, num_val=4,
                              image_size=64)


# ------------------------------------------------------------------------------------------------------------
# Done when 1: a converted random-weight R50 checkpoint loads strictly and gives this repository's outputs


@pytest.mark.parametrize("dc5", [False, True], ids=["R50", "R50-DC5"])
def test_converted_r50_loads_strictly_and_matches_this_repository(tmp_path, dc5):
    torch.manual_seed(0)
    model, _, _ = build_model(make_args(backbone="resnet50", num_classes=91, dilation=dc5, **TINY))
    model.eval()
    src, dst = tmp_path / "detr_r50.pth", tmp_path / "detr_r50_d2.pth"
    torch.save({"model": model.state_dict()}, src)
    converter.main(["--source_model", str(src), "--output_model", str(dst)])

    d2_model = d2_build_model(d2_cfg(DET_CONFIG, [*TINY_OPTS, "MODEL.RESNETS.RES5_DILATION", 2 if dc5 else 1]))
    d2_model.eval()
    state = torch.load(dst, weights_only=True)["model"]
    d2_model.load_state_dict(state, strict=True)
    # and through Detectron2's own checkpointer, which reports what it could not load instead of failing
    incompatible = DetectionCheckpointer(d2_model)._load_model({"model": dict(state)})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes

    torch.manual_seed(1)
    images = [torch.randint(0, 256, (3, 83, 121), dtype=torch.uint8),
              torch.randint(0, 256, (3, 100, 64), dtype=torch.uint8)]  # two sizes: padding and its mask matter
    with torch.no_grad():
        ours = model([torchvision_input(im) for im in images])
        _, samples = d2_model.preprocess_image([{"image": im} for im in images])
        theirs = d2_model.detr(samples)
        results = d2_model([{"image": im, "height": 2 * im.shape[1], "width": 2 * im.shape[2]} for im in images])
    rows = converter.COCO_DETECTION_IDS + [91]
    torch.testing.assert_close(theirs["pred_logits"], ours["pred_logits"][..., rows], rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs["pred_boxes"], ours["pred_boxes"], rtol=0, atol=1e-4)
    assert theirs["pred_logits"].shape[-1] == 81
    for aux_d2, aux in zip(theirs["aux_outputs"], ours["aux_outputs"]):
        torch.testing.assert_close(aux_d2["pred_boxes"], aux["pred_boxes"], rtol=0, atol=1e-4)

    # inference: main.py's PostProcess (on the kept rows) at the requested output size, contiguous class ids
    for i, (im, result) in enumerate(zip(images, results)):
        inst = result["instances"]
        h, w = 2 * im.shape[1], 2 * im.shape[2]
        assert inst.image_size == (h, w) and len(inst) == 30
        scores, labels = ours["pred_logits"][i][:, rows].softmax(-1)[:, :-1].max(-1)
        torch.testing.assert_close(inst.scores, scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(inst.pred_classes, labels)
        cx, cy, bw, bh = ours["pred_boxes"][i].unbind(-1)
        xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        torch.testing.assert_close(inst.pred_boxes.tensor, xyxy, rtol=0, atol=1e-3)


@pytest.mark.parametrize("layout, config, opts", [
    ("detr_resnet50", DET_CONFIG, []),
    ("detr_resnet101", DET_CONFIG, ["MODEL.RESNETS.DEPTH", "101"]),
    ("detr_resnet50_panoptic", SEGM_CONFIG, []),
])
def test_published_checkpoint_layouts_fit_the_d2_model(layout, config, opts):
    """Every key and shape of the published checkpoints, converted, is the full-size d2 model's state dict."""
    path = GOLDEN_DIR / "hub_state_dict_layouts.json"
    if not path.exists():
        pytest.skip(f"golden data {path} is absent (it ships only beside the project's own checkout)")
    shapes = json.loads(path.read_text())[layout]
    converted, _ = converter.convert_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    d2_model = d2_build_model(d2_cfg(config, ["MODEL.DEVICE", "cpu", *opts]))
    expected = {k: tuple(v.shape) for k, v in d2_model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


# ------------------------------------------------------------------------------------------------------------
# Done when 2: --eval-only through Detectron2's COCOEvaluator gives main.py --eval's bbox AP


def _ap(model, samples, targets, dataset) -> float:
    """bbox AP of ``model`` on the batch, through this repository's PostProcess and CocoEvaluator."""
    from datasets.coco_eval import CocoEvaluator
    from models.detr import PostProcess

    model.eval()
    with torch.no_grad():
        outputs = model(samples)
    results = PostProcess()(outputs, torch.stack([t["orig_size"] for t in targets]))
    evaluator = CocoEvaluator(dataset.coco, ["bbox"])
    evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
    evaluator.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    model.train()
    return float(evaluator.coco_eval["bbox"].stats[0])


@pytest.fixture(scope="module")
def overfit_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    """A tiny R18 DETR trained on the 4 validation images until it finds most of their objects (AP about 0.3), so
    that the AP compared below is not a comparison of zeros; random weights predict one box for every query."""
    torch.manual_seed(0)
    args = make_args(backbone="resnet18", num_classes=4, dataset_file="coco", coco_path=str(synthetic_root),
                     val_size=64, **TINY)
    model, criterion, _ = build_model(args)
    dataset = build_dataset("val", args)
    samples, targets = collate_fn([item for item in dataset])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tensors are tiny: one thread is several times faster on a busy machine
    try:
        # train until the model finds most objects (checked every 100 steps): a fixed number of steps is fragile,
        # the AP it reaches moves with any change in rounding (thread count, fused attention, ...)
        for step in range(1, 1501):
            losses = criterion(model(samples), targets)
            loss = sum(v * criterion.weight_dict[k] for k, v in losses.items() if k in criterion.weight_dict)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            if step % 100 == 0 and _ap(model, samples, targets, dataset) > 0.3:
                break
        model.train()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        # The synthetic categories are 1..3, so row 0 of the 4 + 1 rows stands for no category: a fully trained
        # model gives it no probability. Detectron2's head (3 + 1 rows) has no such row, so with some probability
        # left on row 0 the two softmaxes would differ; make it what training converges to.
        model.class_embed.bias[0] = -30.0
    path = tmp_path_factory.mktemp("overfit") / "r18_overfit.pth"
    torch.save({"model": model.state_dict(), "args": {}}, path)
    return path


@pytest.mark.slow
def test_eval_only_bbox_ap_equals_main_py(synthetic_root, overfit_checkpoint, tmp_path):
    ann = synthetic_root / "annotations" / "instances_val2017.json"
    ckpt = overfit_checkpoint
    converted = tmp_path / "r18_overfit_d2.pth"
    converter.main(["--source_model", str(ckpt), "--output_model", str(converted), "--categories", str(ann)])

    main_out = tmp_path / "main_eval"
    main_flags = [f"--{k} {v}" for k, v in TINY.items()]
    run(["main.py", "--eval", "--resume", ckpt, "--dataset_file", "coco", "--coco_path", synthetic_root,
         "--num_classes", "4", "--backbone", "resnet18", "--backbone_weights", "none", "--val_size", "64",
         "--device", "cpu", "--num_workers", "0", "--batch_size", "1", "--output_dir", main_out,
         *" ".join(main_flags).split()])
    main_eval = torch.load(main_out / "eval.pth", weights_only=True)
    main_stats = main_eval["stats"]

    d2_out = tmp_path / "d2_eval"
    log = run(["-m", "d2.train_net", "--eval-only", "--config-file", DET_CONFIG,
               "--coco-dataset", "synthetic_val", ann, synthetic_root / "val2017",
               "MODEL.WEIGHTS", converted, "MODEL.DETR.NUM_CLASSES", "3", *TINY_OPTS, *R18_OPTS,
               "DATASETS.TRAIN", "()", "DATASETS.TEST", '("synthetic_val",)', "INPUT.MIN_SIZE_TEST", "64",
               "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", d2_out])
    assert "COCOEvaluator" in log or "Evaluation results for bbox" in log
    bbox = json.loads((d2_out / "eval_results.json").read_text())["bbox"]
    d2_stats = [bbox[k] / 100 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    print(f"bbox AP (AP, AP50, AP75, APs, APm, APl): main.py {[round(x, 6) for x in main_stats[:6]]}, "
          f"Detectron2 {[round(x, 6) for x in d2_stats]}")
    assert main_stats[0] > 0.05  # a comparison of two zeros would prove nothing
    for ours, theirs in zip(main_stats[:6], d2_stats):
        if ours >= 0:  # -1: no objects of that size in the split; Detectron2 reports nan
            assert abs(ours - theirs) < 1e-3
    # per category: Detectron2 maps its contiguous classes back to the category ids
    names = {c["id"]: c["name"] for c in json.loads(ann.read_text())["categories"]}
    for k, cat_id in enumerate(main_eval["params"]["catIds"]):
        precision = main_eval["precision"][:, :, k, 0, -1]  # [IoU thresholds, recall points], area all, 100 dets
        ours = float(precision[precision > -1].mean())
        assert abs(ours - bbox[f"AP-{names[cat_id]}"] / 100) < 1e-3, names[cat_id]


def test_original_commands_run_from_inside_d2(synthetic_root, tmp_path):
    """The original's commands, run from inside d2/ as files: python converter.py, then python train_net.py
    --eval-only --config configs/detr_256_6_6_torchvision.yaml MODEL.WEIGHTS converted.pth."""
    torch.manual_seed(0)
    model, _, _ = build_model(make_args(backbone="resnet18", num_classes=4, **TINY))
    src = tmp_path / "tiny_r18.pth"
    torch.save({"model": model.state_dict(), "args": {}}, src)
    ann = synthetic_root / "annotations" / "instances_val2017.json"
    converted, out = tmp_path / "converted.pth", tmp_path / "eval"
    d2_dir = REPO / "d2"
    run(["converter.py", "--source_model", src, "--output_model", converted, "--categories", ann], cwd=d2_dir)
    log = run(["train_net.py", "--eval-only", "--config", "configs/detr_256_6_6_torchvision.yaml",
               "--coco-dataset", "synthetic_val", ann, synthetic_root / "val2017",
               "MODEL.WEIGHTS", converted, "MODEL.DETR.NUM_CLASSES", "3", *TINY_OPTS, *R18_OPTS,
               "DATASETS.TRAIN", "()", "DATASETS.TEST", '("synthetic_val",)', "INPUT.MIN_SIZE_TEST", "64",
               "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", out], cwd=d2_dir)
    assert "Evaluation results for bbox" in log
    assert "AP" in json.loads((out / "eval_results.json").read_text())["bbox"]


def test_import_detr_from_inside_d2():
    """The original's ``import detr`` from inside d2/: the wrapper's package, with the meta-architecture registered."""
    code = ("import detr\n"
            "from detectron2.modeling import META_ARCH_REGISTRY\n"
            "assert META_ARCH_REGISTRY.get('Detr') is detr.Detr\n"
            "print(detr.add_detr_config.__name__, detr.Detr.__name__, detr.DetrDatasetMapper.__name__)\n")
    out = run(["-c", code], cwd=REPO / "d2")
    assert "add_detr_config Detr DetrDatasetMapper" in out


# ------------------------------------------------------------------------------------------------------------
# Done when 3: training iterations through Detectron2's trainer, a checkpoint, and --resume continuing from it


def _train_cmd(synthetic_root: Path, out: Path, max_iter: int, resume: bool) -> list:
    return ["-m", "d2.train_net", "--config-file", DET_CONFIG, *(["--resume"] if resume else []),
            "--coco-dataset", "synthetic_train", synthetic_root / "annotations" / "instances_train2017.json",
            synthetic_root / "train2017",
            "MODEL.WEIGHTS", "", "MODEL.DETR.NUM_CLASSES", "3", *TINY_OPTS, *R18_OPTS,
            "DATASETS.TRAIN", '("synthetic_train",)', "DATASETS.TEST", "()",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "(4,)",
            "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0",
            "INPUT.MIN_SIZE_TRAIN", "(56, 64)", "INPUT.MAX_SIZE_TRAIN", "100", "INPUT.CROP.PRE_RESIZE", "(48, 64)",
            "INPUT.CROP.SIZE", "(32, 48)", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", out]


def test_train_writes_a_checkpoint_that_resume_continues(synthetic_root, tmp_path):
    out = tmp_path / "train"
    log = run(_train_cmd(synthetic_root, out, max_iter=3, resume=False))
    assert "Starting training from iteration 0" in log
    first = torch.load(out / "model_final.pth", weights_only=True)
    assert first["iteration"] == 2 and set(first["trainer"]["hooks"]) == {"LRScheduler"}
    assert (out / "model_0000001.pth").is_file() and (out / "last_checkpoint").read_text() == "model_final.pth"
    losses = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert len(losses) >= 1 and all(torch.isfinite(torch.tensor(m["total_loss"])) for m in losses)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "class_error"} <= set(losses[-1])
    # the AdamW groups: the backbone at BASE_LR * BACKBONE_MULTIPLIER
    assert {g["lr"] for g in first["trainer"]["_trainer"]["optimizer"]["param_groups"]} == {1e-4, 1e-5}

    log = run(_train_cmd(synthetic_root, out, max_iter=5, resume=True))
    assert re.search(r"Loading from .*model_final\.pth", log)
    assert "Starting training from iteration 3" in log
    resumed = torch.load(out / "model_final.pth", weights_only=True)
    assert resumed["iteration"] == 4
    # the lr dropped at iteration 4 (SOLVER.STEPS), after the resume: the scheduler was restored
    lrs = sorted(g["lr"] for g in resumed["trainer"]["_trainer"]["optimizer"]["param_groups"])
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-5)
    changed = [k for k in first["model"] if not torch.equal(first["model"][k], resumed["model"][k])]
    assert any("transformer" in k for k in changed)


# ------------------------------------------------------------------------------------------------------------
# Done when 4: the panoptic config builds and runs with a converted panoptic checkpoint


def test_panoptic_config_runs_a_converted_panoptic_checkpoint(tmp_path):
    torch.manual_seed(0)
    model, _, _ = build_model(make_args(backbone="resnet50", num_classes=250, masks=True, **TINY_SEGM))
    model.eval()
    src, dst = tmp_path / "detr_r50_panoptic.pth", tmp_path / "detr_r50_panoptic_d2.pth"
    torch.save({"model": model.state_dict()}, src)
    converter.main(["--source_model", str(src), "--output_model", str(dst)])  # 251 rows -> COCO panoptic's 133

    cfg = d2_cfg(SEGM_CONFIG, [*TINY_SEGM_OPTS, "MODEL.WEIGHTS", dst, "MODEL.DETR.PANOPTIC_THRESHOLD", "0.0"])
    d2_model = d2_build_model(cfg)
    d2_model.load_state_dict(torch.load(dst, weights_only=True)["model"], strict=True)
    d2_model.eval()

    torch.manual_seed(1)
    images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8),
              torch.randint(0, 256, (3, 80, 72), dtype=torch.uint8)]
    with torch.no_grad():
        ours = model([torchvision_input(im) for im in images])
        _, samples = d2_model.preprocess_image([{"image": im} for im in images])
        theirs = d2_model.detr(samples)
        results = d2_model([{"image": im} for im in images])
    rows = converter.COCO_PANOPTIC_IDS + [250]
    torch.testing.assert_close(theirs["pred_logits"], ours["pred_logits"][..., rows], rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs["pred_boxes"], ours["pred_boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs["pred_masks"], ours["pred_masks"], rtol=0, atol=1e-4)

    meta = MetadataCatalog.get("coco_2017_train_panoptic")
    for im, result in zip(images, results):
        ids, segments = result["panoptic_seg"]
        assert tuple(ids.shape) == tuple(im.shape[1:])
        assert segments and set(ids.unique().tolist()) <= {s["id"] for s in segments}
        for s in segments:  # contiguous ids, things as the COCO panoptic metadata says
            assert 0 <= s["category_id"] < 133
            assert s["isthing"] == (s["category_id"] in meta.thing_dataset_id_to_contiguous_id.values())
        assert result["instances"].pred_masks.shape == (30, *im.shape[1:])


def test_panoptic_box_model_starts_from_the_imagenet_backbone():
    """Panoptic run 1 (d2/README.md): the panoptic config without masks trains the box model from the box config's
    ImageNet ResNet-50, not from a random one whose frozen stem never learns."""
    box_stage = d2_cfg(SEGM_CONFIG, ["MODEL.MASK_ON", "False", "MODEL.DETR.PANOPTIC_ON", "False"])
    assert box_stage.MODEL.WEIGHTS == d2_cfg(DET_CONFIG, []).MODEL.WEIGHTS
    assert "ImageNetPretrained/torchvision/R-50" in box_stage.MODEL.WEIGHTS
    assert box_stage.MODEL.BACKBONE.FREEZE_AT == 2


def _register_synthetic_panoptic(synthetic_root: Path) -> str:
    from d2.train_net import panoptic_metadata

    ann = synthetic_root / "annotations"
    name = "d2_test_synthetic_panoptic_train"
    if name not in MetadataCatalog.list():
        register_coco_panoptic(name, panoptic_metadata(str(ann / "panoptic_train2017.json")),
                               str(synthetic_root / "train2017"), str(ann / "panoptic_train2017"),
                               str(ann / "panoptic_train2017.json"))
    return name


def test_frozen_box_model_is_not_replaced_by_model_weights(synthetic_root, tmp_path):
    """Panoptic run 2: MODEL.WEIGHTS (the ImageNet ResNet, a torchvision .pkl that Detectron2 matches by name
    suffix) is loaded after the model is built; the frozen box model's backbone must stay FROZEN_WEIGHTS'."""
    import pickle

    from d2.train_net import Trainer

    name = _register_synthetic_panoptic(synthetic_root)
    opts = [*TINY_SEGM_OPTS, *R18_OPTS, "MODEL.DETR.NUM_CLASSES", "5", "DATASETS.TRAIN", f'("{name}",)',
            "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "SOLVER.IMS_PER_BATCH", "2",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", tmp_path / "out"]
    torch.manual_seed(0)
    box = d2_build_model(d2_cfg(DET_CONFIG, [*TINY_SEGM_OPTS, *R18_OPTS, "MODEL.DETR.NUM_CLASSES", "5"]))
    box_state = {k: v + 1.0 if v.is_floating_point() else v for k, v in box.state_dict().items()}
    frozen = tmp_path / "box_model.pth"
    torch.save({"model": box_state}, frozen)
    # an ImageNet-like backbone in the layout of Detectron2's torchvision R-50.pkl: every weight 0.5
    prefix = "detr.backbone.0.backbone."
    imagenet = {k[len(prefix):]: np.full(tuple(v.shape), 0.5, dtype=np.float32)
                for k, v in box_state.items() if k.startswith(prefix)}
    pkl = tmp_path / "R-18-like.pkl"
    pkl.write_bytes(pickle.dumps({"model": imagenet, "__author__": "torchvision", "matching_heuristics": True}))

    cfg = d2_cfg(SEGM_CONFIG, [*opts, "MODEL.WEIGHTS", pkl, "MODEL.DETR.FROZEN_WEIGHTS", frozen])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    loaded = trainer.checkpointer.model.detr.detr.state_dict()
    for key, value in box_state.items():
        torch.testing.assert_close(loaded[key[len("detr."):]], value, rtol=0, atol=0, msg=key)


def test_panoptic_training_step_on_synthetic_panoptic_data(synthetic_root):
    name = _register_synthetic_panoptic(synthetic_root)
    cfg = d2_cfg(SEGM_CONFIG, [*TINY_SEGM_OPTS, *R18_OPTS, "MODEL.DETR.NUM_CLASSES", "5",
                               "DATASETS.TRAIN", f'("{name}",)', "INPUT.MIN_SIZE_TRAIN", "(64,)",
                               "INPUT.CROP.ENABLED", "False"])

    dicts = DatasetCatalog.get(name)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in dicts[:2]]
    for item, d in zip(batch, dicts):
        inst = item["instances"]
        # sky and ground (stuff, contiguous 3 and 4) and the shapes (things, 0..2), each with a mask and its box
        assert len(inst) == len([s for s in d["segments_info"] if not s.get("iscrowd", 0)])
        assert {3, 4} <= set(inst.gt_classes.tolist()) and int(inst.gt_classes.max()) <= 4
        assert inst.gt_masks.tensor.shape[1:] == item["image"].shape[1:]
        boxes = inst.gt_boxes.tensor
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
    d2_model = d2_build_model(cfg)
    d2_model.train()
    with EventStorage():
        losses = d2_model(batch)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    head = d2_model.detr.mask_head.out_lay.weight
    assert head.grad is not None and torch.isfinite(head.grad).all()


# ------------------------------------------------------------------------------------------------------------
# Config, mapper


def test_shipped_config_defaults_are_main_py_defaults():
    args = get_args_parser().parse_args([])
    flags = set(vars(args))
    assert flags <= set(MAIN_PY_FLAGS) | set(NOT_IN_CONFIG), \
        f"main.py flags without a Detectron2 key or a reason: {sorted(flags - set(MAIN_PY_FLAGS) - set(NOT_IN_CONFIG))}"
    cfg = d2_cfg(DET_CONFIG, [])
    for flag, (key, to_cfg) in MAIN_PY_FLAGS.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        expected = to_cfg(args) if to_cfg else getattr(args, flag)
        assert value == pytest.approx(expected), f"{key} is {value!r}, main.py --{flag} defaults to {expected!r}"
    assert cfg.INPUT.MAX_SIZE_TEST == args.max_size
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"


def test_mapper_applies_detr_augmentation(synthetic_root):

    dicts = load_coco_json(str(synthetic_root / "annotations" / "instances_train2017.json"),
                           str(synthetic_root / "train2017"), "d2_test_synthetic_mapper")
    cfg = d2_cfg(DET_CONFIG, ["INPUT.MIN_SIZE_TRAIN", "(96, 128)", "INPUT.MAX_SIZE_TRAIN", "112",
                              "INPUT.CROP.PRE_RESIZE", "(80,)", "INPUT.CROP.SIZE", "(40, 60)"])
    mapper = DetrDatasetMapper(cfg, is_train=True)
    shapes = set()
    np.random.seed(0)
    for _ in range(20):
        item = mapper(dicts[0])
        h, w = item["image"].shape[1:]
        shapes.add((h, w))
        assert max(h, w) <= 112  # the longer side capped
        boxes = item["instances"].gt_boxes.tensor
        assert bool((boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all())
    # both branches were taken: the plain one gives the image resized to 96 or 128 (the longer side capped at 112),
    # the crop branch (80, then a crop of 40..60 on each side independently, then the same resize) other shapes
    plain = {ResizeShortestEdge.get_output_shape(dicts[0]["height"], dicts[0]["width"], s, 112) for s in (96, 128)}
    assert plain <= shapes and shapes - plain
    test_item = DetrDatasetMapper(cfg, is_train=False)(dicts[0])
    expected = ResizeShortestEdge.get_output_shape(dicts[0]["height"], dicts[0]["width"], 800, 1333)
    assert tuple(test_item["image"].shape[1:]) == expected and "instances" not in test_item
