"""datasets.transforms: parity with the original DETR's golden outputs, and geometric invariants."""
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import datasets.transforms as T

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture(scope="module")
def golden():
    path = GOLDEN / "transforms.pth"
    if not path.exists():
        pytest.skip(f"golden data {path} not found (it ships only with the project's shared/ folder)")
    return torch.load(path, weights_only=False)


GOLDEN_OPS = {
    "resize_short_100_max_120": lambda img, tgt: T.resize(img, tgt, 100, max_size=120),
    "resize_short_48": lambda img, tgt: T.resize(img, tgt, 48),
    "crop_10_30_40_45": lambda img, tgt: T.crop(img, tgt, (10, 30, 40, 45)),
    "hflip": T.hflip,
    "to_tensor_normalize": T.Compose([T.ToTensor(), T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)]),
}


def test_golden_covers_all_cases(golden):
    assert {case["name"] for case in golden["cases"]} == set(GOLDEN_OPS)


@pytest.mark.parametrize("name", sorted(GOLDEN_OPS))
def test_golden_parity(golden, name):
    case = next(c for c in golden["cases"] if c["name"] == name)
    image = PIL.Image.fromarray(golden["image"].numpy())
    target = {k: v.clone() for k, v in golden["target"].items()}
    out_image, out_target = GOLDEN_OPS[name](image, target)

    expected = case["image"]
    if isinstance(out_image, PIL.Image.Image):
        out = torch.from_numpy(np.array(out_image))
        assert out.shape == expected.shape
        close = (out.int() - expected.int()).abs() <= 2
        assert close.float().mean() >= 0.995
    else:
        assert out_image.shape == expected.shape
        torch.testing.assert_close(out_image, expected, rtol=0, atol=1e-5)

    assert set(out_target) == set(case["target"])
    for key, value in case["target"].items():
        assert out_target[key].dtype == value.dtype, key
        assert torch.equal(out_target[key], value), key  # boxes, areas, sizes, labels, masks: exact
    # the input target is not modified in place
    for key, value in golden["target"].items():
        assert torch.equal(target[key], value), key


def test_resize_size_rule():
    # the original's rule: short side to `size` unless the long side would exceed max_size
    img = PIL.Image.new("RGB", (80, 60))
    assert T.resize(img, None, 100, max_size=120)[0].size == (120, 90)
    assert T.resize(img, None, 48)[0].size == (64, 48)
    assert T.resize(img, None, 60)[0].size == (80, 60)  # already that size
    # short side round(120 * 100 / 333) = 36, long side int(36 * 333 / 100) = 119 (truncated, not 120)
    assert T.resize(PIL.Image.new("RGB", (100, 333)), None, 50, max_size=120)[0].size == (36, 119)
    assert T.resize(img, None, (30, 20))[0].size == (30, 20)  # a sequence is (w, h)


def test_pad_bottom_right():
    img = PIL.Image.new("RGB", (8, 6), (255, 0, 0))
    target = {"boxes": torch.tensor([[1.0, 1.0, 4.0, 5.0]]), "masks": torch.ones(1, 6, 8, dtype=torch.bool)}
    out, t = T.pad(img, target, (3, 2))
    assert out.size == (11, 8)
    assert torch.equal(t["size"], torch.tensor([8, 11]))
    assert torch.equal(t["boxes"], target["boxes"])
    assert t["masks"].shape == (1, 8, 11) and t["masks"][0, :6, :8].all() and t["masks"].sum() == 48


def _random_sample(rng: np.random.Generator, h: int = 70, w: int = 90, n: int = 5):
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    boxes, masks = [], []
    for _ in range(n):
        x0, y0 = rng.integers(0, w - 5), rng.integers(0, h - 5)
        x1, y1 = rng.integers(x0 + 2, w + 1), rng.integers(y0 + 2, h + 1)
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True  # the mask fills its box, so it must stay inside it
        boxes.append([x0, y0, x1, y1])
        masks.append(mask)
    boxes = torch.tensor(boxes, dtype=torch.float32)
    target = {
        "boxes": boxes,
        "labels": torch.arange(1, n + 1),
        "area": (boxes[:, 2:] - boxes[:, :2]).prod(1),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "masks": torch.stack(masks),
        "size": torch.tensor([h, w]),
        "orig_size": torch.tensor([h, w]),
        "image_id": torch.tensor([7]),
    }
    return image, target


def _check_consistent(image: PIL.Image.Image, t: dict, tol: float = 0.0):
    w, h = image.size
    n = len(t["labels"])
    assert t["boxes"].shape == (n, 4) and t["area"].shape == (n,) and t["iscrowd"].shape == (n,)
    assert t["masks"].shape == (n, h, w) and t["masks"].dtype == torch.bool
    assert torch.equal(t["size"], torch.tensor([h, w]))
    boxes = t["boxes"]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
    for box, mask in zip(boxes, t["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):  # mask extent inside its box (up to the nearest-neighbour rounding of resize)
            assert xs.min() >= box[0] - 1 - tol and xs.max() + 1 <= box[2] + 1 + tol
            assert ys.min() >= box[1] - 1 - tol and ys.max() + 1 <= box[3] + 1 + tol


def test_random_geometry_properties():
    rng = np.random.default_rng(0)
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(50):
        image, target = _random_sample(rng)
        labels_before = target["labels"].tolist()
        op = rng.integers(0, 4)
        if op == 0:
            h, w = target["size"].tolist()
            ch, cw = int(rng.integers(5, h + 1)), int(rng.integers(5, w + 1))
            image, target = T.RandomCrop((ch, cw))(image, target)
            # after a crop, area is exactly the clamped box area and kept boxes are non-empty
            box_area = (target["boxes"][:, 2:] - target["boxes"][:, :2]).prod(1)
            assert torch.equal(target["area"], box_area)
            assert (box_area > 0).all()
        elif op == 1:
            image, target = T.RandomHorizontalFlip(p=1.0)(image, target)
        elif op == 2:
            image, target = T.RandomResize([int(rng.integers(20, 120))], max_size=150)(image, target)
        else:
            image, target = T.RandomSizeCrop(10, 60)(image, target)
        # kept labels are a subsequence of the input labels, in order
        kept = target["labels"].tolist()
        it = iter(labels_before)
        assert all(label in it for label in kept)
        _check_consistent(image, target)


def test_hflip_is_an_involution():
    image, target = _random_sample(np.random.default_rng(1))
    image2, target2 = T.hflip(*T.hflip(image, target))
    assert np.array_equal(np.array(image2), np.array(image))
    for key in ("boxes", "masks", "area", "labels"):
        assert torch.equal(target2[key], target[key])


def test_crop_drops_empty_and_uses_masks_without_boxes():
    image, target = _random_sample(np.random.default_rng(2))
    target = {k: v for k, v in target.items() if k != "boxes"}
    _, t = T.crop(image, target, (0, 0, 10, 10))
    assert t["masks"].shape[1:] == (10, 10)
    assert t["masks"].flatten(1).any(1).all()  # objects without pixels in the window were dropped
    assert len(t["labels"]) == len(t["masks"]) == len(t["area"])


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_make_coco_transforms_outputs_normalised_cxcywh(image_set):
    rng = np.random.default_rng(3)
    random.seed(3)
    torch.manual_seed(3)
    transforms = T.make_coco_transforms(image_set, scales=[64, 80], max_size=100, val_size=64,
                                        crop_scales=[60, 70], crop_size=(30, 50))
    for _ in range(10):
        image, target = _random_sample(rng)
        out, t = transforms(image, target)
        assert out.dtype == torch.float32 and out.shape[0] == 3
        assert max(out.shape[-2:]) <= 100
        assert torch.equal(t["size"], torch.tensor(out.shape[-2:]))
        boxes = t["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all()
        # cx - w/2 >= 0 and cx + w/2 <= 1 (up to float rounding)
        assert (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6).all()
        assert (boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6).all()
        assert len(boxes) == len(t["labels"]) == len(t["masks"])
        if image_set == "val":
            assert min(out.shape[-2:]) == 64


def test_make_coco_transforms_defaults_match_original():
    train = T.make_coco_transforms("train")
    select = train.transforms[1]
    assert isinstance(select, T.RandomSelect)
    assert select.transforms1.sizes == list(range(480, 801, 32)) and select.transforms1.max_size == 1333
    crop_branch = select.transforms2.transforms
    assert crop_branch[0].sizes == [400, 500, 600] and crop_branch[0].max_size is None
    assert (crop_branch[1].min_size, crop_branch[1].max_size) == (384, 600)
    val = T.make_coco_transforms("val")
    assert val.transforms[0].sizes == [800] and val.transforms[0].max_size == 1333
    no_crop = T.make_coco_transforms("train", crop_scales=[])
    assert isinstance(no_crop.transforms[1], T.RandomResize)
    with pytest.raises(ValueError, match="unknown image_set"):
        T.make_coco_transforms("test")


def test_random_size_crop_smaller_image_than_min_size():
    # the original raised ValueError here; the crop now keeps the whole side
    image, target = _random_sample(np.random.default_rng(4), h=30, w=40)
    out, t = T.RandomSizeCrop(384, 600)(image, target)
    assert out.size == (40, 30)
    assert torch.equal(t["boxes"], target["boxes"])
