"""Attention maps (tools.inference with attention=True) and the drawings of tools.visualize."""
import io
import math

import numpy as np
import PIL.Image
import pytest
import torch

from datasets.transforms import make_coco_transforms
from models import build_model
from tools import visualize as V
from tools.inference import Prediction, Predictor

from conftest import tiny_args


def synthetic_model(**overrides):
    """A tiny model on the synthetic recipe's path (spatial prior: the decoder's cross-attention gets a bias)."""
    base = dict(spatial_prior=True, pos_at_input=True, backbone_last_layer="layer3", backbone_norm="bn",
                aux_loss=False)
    base.update(overrides)
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(**base))
    return model.eval()


def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in ((64, 96), (80, 64))]


@pytest.fixture(scope="module", params=["layer3 + spatial prior", "layer4"])
def model(request):
    if request.param == "layer4":
        return synthetic_model(spatial_prior=False, pos_at_input=False, backbone_last_layer="layer4")
    return synthetic_model()


def feature_sizes(model, images, batched: bool) -> list:
    """The (h, w) of each image's feature map, straight from the backbone: alone, or within the padded batch (where
    the downsampled padding mask decides which cells are the image's)."""
    transform = make_coco_transforms("val", val_size=64, max_size=100)
    tensors = [transform(image, None)[0] for image in images]
    with torch.no_grad():
        if not batched:
            return [tuple(model.backbone(_nested([t]))[0][-1].tensors.shape[-2:]) for t in tensors]
        mask = model.backbone(_nested(tensors))[0][-1].mask  # [B, h, w] True on padding
    return [(int((~m[:, 0]).sum()), int((~m[0, :]).sum())) for m in mask]


def _nested(tensors):
    from util.nested_tensor import nested_tensor_from_tensor_list

    return nested_tensor_from_tensor_list(tensors)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_attention_maps_have_the_feature_map_shape_and_sum_to_one(model, batch_size):
    predictor = Predictor(model, val_size=64, max_size=100, device="cpu")
    preds = predictor(images(), score_threshold=0.0, batch_size=batch_size, attention=True)
    num_queries = model.num_queries
    for (h, w), pred in zip(feature_sizes(model, images(), batched=batch_size > 1), preds):
        for layer in range(2):
            cross = pred.attention[f"decoder.{layer}.cross_attn"]
            assert cross.shape == (num_queries, h, w)
            torch.testing.assert_close(cross.sum((1, 2)), torch.ones(num_queries), atol=1e-5, rtol=0)
            assert pred.attention[f"decoder.{layer}.self_attn"].shape == (num_queries, num_queries)
        encoder = pred.attention["encoder.0.self_attn"]
        assert encoder.shape == (h, w, h, w)
        torch.testing.assert_close(encoder.sum((2, 3)), torch.ones(h, w), atol=1e-5, rtol=0)


def _mha_inputs(module, args, kwargs) -> dict:
    names = ["query", "key", "value"]
    got = dict(zip(names, args))
    got.update({k: v for k, v in kwargs.items() if k in names + ["attn_mask", "key_padding_mask"]})
    return got


def manual_weights(mha: torch.nn.MultiheadAttention, query, key, attn_mask=None, key_padding_mask=None):
    """Head-averaged attention weights [B, L, S] from the layer's own projection weights: softmax(q k^T / sqrt(d)
    + mask), written out rather than through torch's attention functions."""
    e, heads = mha.embed_dim, mha.num_heads
    d = e // heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = query @ w[:e].T + b[:e]            # [L, B, E]
    k = key @ w[e:2 * e].T + b[e:2 * e]    # [S, B, E]
    length, batch = q.shape[:2]
    q = q.reshape(length, batch, heads, d).permute(1, 2, 0, 3)  # [B, heads, L, d]
    k = k.reshape(k.shape[0], batch, heads, d).permute(1, 2, 0, 3)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, heads, L, S]
    if attn_mask is not None:  # float [B * heads, L, S]
        logits = logits + attn_mask.reshape(batch, heads, length, -1)
    if key_padding_mask is not None:
        pad = key_padding_mask if key_padding_mask.dtype != torch.bool else torch.zeros_like(
            key_padding_mask, dtype=logits.dtype).masked_fill(key_padding_mask, float("-inf"))
        logits = logits + pad[:, None, None, :]
    return logits.softmax(-1).mean(1)


def test_attention_maps_equal_the_weights_computed_from_the_layers_projections(model):
    """The maps are the transformer's own weights: recomputed by hand from the inputs each attention layer got."""
    transformer = model.transformer
    layers = {"decoder.1.cross_attn": transformer.decoder.layers[1].multihead_attn,
              "encoder.0.self_attn": transformer.encoder.layers[0].self_attn,
              "decoder.0.self_attn": transformer.decoder.layers[0].self_attn}
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda m, a, k, key=key: inputs.__setitem__(key, _mha_inputs(m, a, k)),
                                              with_kwargs=True) for key, module in layers.items()]
    try:
        preds = Predictor(model, val_size=64, max_size=100, device="cpu")(images(), score_threshold=0.0,
                                                                           batch_size=2, attention=True)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        manual = {key: manual_weights(module, inputs[key]["query"], inputs[key]["key"],
                                      inputs[key].get("attn_mask"), inputs[key].get("key_padding_mask"))
                  for key, module in layers.items()}
    padded = [max(s) for s in zip(*feature_sizes(model, images(), batched=False))]  # the batch's feature map
    for i, pred in enumerate(preds):
        h, w = pred.attention["encoder.0.self_attn"].shape[:2]
        cross = manual["decoder.1.cross_attn"][i].reshape(-1, *padded)
        torch.testing.assert_close(pred.attention["decoder.1.cross_attn"], cross[:, :h, :w], atol=1e-5, rtol=0)
        assert float(cross.sum() - cross[:, :h, :w].sum()) < 1e-6  # nothing on the other image's padding
        enc = manual["encoder.0.self_attn"][i].reshape(*padded, *padded)
        torch.testing.assert_close(pred.attention["encoder.0.self_attn"], enc[:h, :w, :h, :w], atol=1e-5, rtol=0)
        torch.testing.assert_close(pred.attention["decoder.0.self_attn"], manual["decoder.0.self_attn"][i],
                                   atol=1e-5, rtol=0)


def test_attention_does_not_change_the_predictions_nor_the_fast_path(model):
    predictor = Predictor(model, val_size=64, max_size=100, device="cpu")
    plain = predictor(images(), score_threshold=0.0, batch_size=2)
    with_attention = predictor(images(), score_threshold=0.0, batch_size=2, attention=True)
    for a, b in zip(plain, with_attention):
        torch.testing.assert_close(a.boxes, b.boxes, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=0)
        assert a.attention is None
    layers = list(model.transformer.encoder.layers) + list(model.transformer.decoder.layers)
    assert not any(layer.need_weights for layer in layers)  # back to the fused attention, which computes no weights
    assert not any(m._forward_hooks for layer in layers for m in layer.modules())


def fake_prediction(size=(100, 200), input_size=(64, 128), boxes=((20.0, 10.0, 120.0, 60.0),), labels=(1,),
                    masks=None, attention=None, colour=(128, 128, 128)) -> Prediction:
    h, w = size
    return Prediction(source="fake", image=PIL.Image.new("RGB", (w, h), colour),
                      scores=torch.full((len(boxes),), 0.9), labels=torch.tensor(labels),
                      boxes=torch.tensor(boxes).reshape(-1, 4), names=[f"class {c}" for c in labels],
                      queries=torch.arange(len(boxes)), input_size=input_size, masks=masks, attention=attention)


def render(fig) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return np.asarray(PIL.Image.open(buffer).convert("RGB")).astype(int)


def test_boxes_are_drawn_where_the_detections_are():
    pred = fake_prediction()
    pixels = render(V.plot_prediction(pred))
    scale = pixels.shape[1] / 200
    assert pixels.shape[:2] == (round(100 * scale), round(200 * scale))  # the image's shape, enlarged to be legible
    colour = np.array(V._colour(1)[:3]) * 255
    # the right edge of the box (x = 120, halfway down) is in the category's colour; the middle of the box is not
    edge = pixels[round(35 * scale), round(120 * scale) - 1: round(120 * scale) + 2]
    assert np.abs(edge - colour).sum(1).min() < 40
    assert np.abs(pixels[round(45 * scale), round(70 * scale)] - 128).max() <= 2
    assert np.abs(pixels[round(90 * scale), round(180 * scale)] - 128).max() <= 2  # far from the box: untouched


def test_masks_tint_their_pixels_only():
    mask = torch.zeros(1, 100, 200, dtype=torch.bool)
    mask[0, 20:50, 30:100] = True
    pred = fake_prediction(masks=mask)
    pixels = render(V.plot_prediction(pred))
    scale = pixels.shape[1] / 200
    inside = pixels[round(35 * scale), round(65 * scale)]
    expected = 0.55 * 128 + 0.45 * np.array(V._colour(1)[:3]) * 255
    assert np.abs(inside - expected).max() <= 3
    assert np.abs(pixels[round(80 * scale), round(160 * scale)] - 128).max() <= 2


def test_panoptic_segments_get_distinct_colours_and_names():
    seg = torch.zeros(100, 200, dtype=torch.int64)
    seg[:, 100:] = 1
    pred = fake_prediction(boxes=(), labels=())
    pred.panoptic = {"segmentation": seg, "segments_info": [
        {"id": 0, "category_id": 4, "isthing": False, "area": 10000, "name": "sky"},
        {"id": 1, "category_id": 5, "isthing": False, "area": 10000, "name": "ground"}]}
    pixels = render(V.plot_prediction(pred))
    scale = pixels.shape[1] / 200
    left, right = pixels[round(10 * scale), round(10 * scale)], pixels[round(10 * scale), round(190 * scale)]
    assert np.abs(left - right).max() > 20 and np.abs(left - 128).max() > 10


def test_feature_cells_and_where_the_map_lies_over_the_image():
    pred = fake_prediction()  # image 200 x 100 (w x h), resized to 128 x 64, feature map 8 x 4: stride 16
    assert V._feature_stride(pred, (4, 8)) == 16
    assert V._extent(pred, (4, 8)) == (0, 200.0, 100.0, 0)
    assert V.feature_cell(pred, (0, 0), (4, 8)) == (0, 0)
    assert V.feature_cell(pred, (199.9, 99.9), (4, 8)) == (3, 7)
    assert V.feature_cell(pred, (100, 50), (4, 8)) == (2, 4)  # input pixel (64, 32) -> cell (32 // 16, 64 // 16)
    # a stride-32 map whose last cells reach past the image (input 70 x 100 -> 3 x 4 cells of 32 pixels)
    pred = fake_prediction(size=(70, 100), input_size=(70, 100))
    assert V._feature_stride(pred, (3, 4)) == 32
    assert V._extent(pred, (3, 4)) == (0, 128.0, 96.0, 0)


def test_attention_figures_and_maps(model):
    pred = Predictor(model, val_size=64, max_size=100, device="cpu")(images()[0], score_threshold=0.0,
                                                                      attention=True)[0]
    last = "decoder.1.cross_attn"
    for k in range(3):
        assert torch.equal(V.decoder_attention_map(pred, k), pred.attention[last][int(pred.queries[k])])
    enc = pred.attention["encoder.0.self_attn"]
    i, j = V.feature_cell(pred, (50, 30), enc.shape[:2])
    assert torch.equal(V.encoder_attention_map(pred, (50, 30)), enc[i, j])

    def shown(ax) -> np.ndarray:  # the attention map drawn over the image in a panel (the second image of its axes)
        return ax.get_images()[1].get_array().data

    # the paper's decoder figure: per detection, its query's attention (top) and its box (bottom)
    fig = V.plot_decoder_attention(pred, [0, 1])
    top, bottom = fig.axes[:2], fig.axes[2:]
    assert [ax.get_title() for ax in top] == [f"query {int(pred.queries[k])}" for k in (0, 1)]
    for ax, k in zip(top, (0, 1)):
        assert np.array_equal(shown(ax), V.decoder_attention_map(pred, k).numpy())
    assert [ax.get_title() for ax in bottom] == [f"{pred.names[k]} {float(pred.scores[k]):.2f}" for k in (0, 1)]
    assert all(len(ax.patches) == 1 for ax in bottom)  # each detection's box
    # the encoder figure: the points, then the self-attention of the feature cell under each point
    points = [(10, 10), (50, 30)]
    fig = V.plot_encoder_attention(pred, points)
    assert [ax.get_title() for ax in fig.axes] == ["points", "self-attention at (10, 10)", "self-attention at (50, 30)"]
    for ax, point in zip(fig.axes[1:], points):
        assert np.array_equal(shown(ax), V.encoder_attention_map(pred, point).numpy())
    assert render(fig).shape[1] == round(3 * 2.6 * 100)  # three panels of 2.6 inches at 100 dpi
    # both in one figure: detections and box centres, then per detection its decoder (top) and encoder (bottom) maps
    fig = V.plot_attention(pred, max_predictions=3)
    k = V._top(pred, 3)
    assert len(fig.axes) == 2 * 4
    assert fig.axes[0].get_title() == "detections" and fig.axes[4].get_title() == "box centres"
    for col in range(1, 4):
        assert np.array_equal(shown(fig.axes[col]), V.decoder_attention_map(pred, k[col - 1]).numpy())
        assert fig.axes[4 + col].get_title() == "encoder at centre"
    no_maps = Predictor(model, val_size=64, max_size=100, device="cpu")(images()[0], score_threshold=0.0)[0]
    with pytest.raises(ValueError, match="attention=True"):
        V.plot_attention(no_maps)
    with pytest.raises(ValueError, match="layer 5"):
        V.decoder_attention_map(pred, 0, layer=5)


def test_save_figure_writes_a_png(tmp_path):
    path = tmp_path / "sub" / "boxes.png"
    V.save_figure(V.plot_prediction(fake_prediction()), path)
    with PIL.Image.open(path) as png:
        assert png.format == "PNG"
    assert [p.name for p in path.parent.iterdir()] == ["boxes.png"]  # no temporary file left
