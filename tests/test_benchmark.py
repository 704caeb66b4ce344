"""util.benchmark runs every row (tiny sizes); timings are printed, never asserted."""
from util import benchmark


def test_quick_benchmark_prints_every_section(capsys):
    text = benchmark.main(["--quick", "--only", "matcher", "data"])
    assert "matmul peak fp32" in text and "Matcher per training step" in text and "images/s" in text
    assert "| row | seconds | ratio | GFLOP/s | note |" in text


def test_plain_reference_is_the_unoptimised_path():
    import hubconf
    from models.backbone import _ConvFrozenBN

    model = hubconf.detr_resnet50().eval()
    plain = benchmark.plain_reference(model)
    assert any(isinstance(m, _ConvFrozenBN) for m in model.modules())
    assert not any(isinstance(m, _ConvFrozenBN) for m in plain.modules())
    assert not plain.backbone[0].channels_last and all(layer.need_weights for layer in plain.transformer.encoder.layers)
    assert list(plain.state_dict()) == list(model.state_dict())


def test_segm_memory_benchmark_runs_every_variant(capsys):
    from util import bench_segm

    rows = bench_segm.main(["--num_queries", "4", "--height", "64", "--width", "64"])
    assert [r["variant"] for r in rows] == list(bench_segm.VARIANTS)
    assert all(r["peak_mib"] >= 0 for r in rows)


def test_flops_of_a_model_in_eval_mode_under_no_grad():
    # FlopCounterMode's module hooks trip over a parameter slice taken under no_grad (requires grad, no grad_fn)
    import torch

    from conftest import tiny_args
    from models import build_model

    for overrides in ({}, {"masks": True, "hidden_dim": 128, "nheads": 8}):
        model = build_model(tiny_args(**overrides))[0].eval()
        with torch.no_grad():
            assert benchmark.flops_of(lambda: model(torch.rand(1, 3, 64, 64))) > 0


def test_recipe_benchmark_compares_every_recipe_on_the_same_batches(tmp_path):
    from datasets.synthetic import generate
    from util import bench_recipe

    generate(tmp_path / "data", num_train=16, num_val=2, seed=0)
    text = bench_recipe.main(["--coco_path", str(tmp_path / "data"), "--flop_batches", "1", "--timed_steps", "1",
                              "--repeats", "1"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "x |" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(bench_recipe.RECIPES)
    assert rows[0].split(" | ")[4] == "1.000x"
    # today's recipe: 6 decoder layers and a 1-block trunk, fewer FLOPs per iteration than the first
    first, today = (float(r.split(" | ")[1]) for r in (rows[0], rows[-1]))
    assert 0.4 < today / first < 0.7
