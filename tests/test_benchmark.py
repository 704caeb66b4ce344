"""tools.benchmarks.cpu runs every row (tiny sizes); timings are printed, never asserted."""
from tools.benchmarks import cpu as benchmark


def test_quick_benchmark_table_has_a_measured_row_for_each_chosen_section(capsys):
    import re

    text = benchmark.main(["--quick", "--only", "matcher", "data"])
    lines = text.splitlines()
    assert lines[:2] == ["| row | seconds | ratio | GFLOP/s | note |", "|---|---:|---:|---|---|"]
    rows = [line[2:-2].split(" | ") for line in lines[2:]]
    sections = [r[0] for r in rows if r[0].startswith("**")]
    # the machine, then only the chosen sections, in order
    assert len(sections) == 3 and "Matcher per training step" in sections[1] and "Data loading" in sections[2]
    by_name = {r[0]: r for r in rows}
    for dtype in ("fp32", "bf16", "fp16"):
        assert float(re.match(r"([\d.]+) GFLOP/s", by_name[f"matmul peak {dtype}"][4]).group(1)) > 0
    # the matcher: the reference row has ratio 1, the other a ratio to it; both timed
    one, together = by_name["layer by layer (one host copy each)"], by_name["all layers together (one host copy)"]
    assert one[2] == "1.00x" and re.fullmatch(r"\d+\.\d\dx", together[2])
    assert float(one[1]) >= 0 and float(together[1]) >= 0
    # data loading: seconds per image and its images/s, for both sizes
    for name in ("synthetic recipe (128 px)", "COCO sizes (shorter side 800)"):
        assert float(by_name[name][1]) >= 0 and re.fullmatch(r"\d+ images/s \(seconds per image\)", by_name[name][4])
    assert len(rows) == 3 + 3 + 2 + 2  # sections + 3 matmul peaks + 2 matcher rows + 2 data rows
    out = capsys.readouterr().out
    assert text in out  # the table is printed too


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
    from tools.benchmarks import segm as bench_segm

    # 100 queries upsampled at once to 400x532 hold 100 x 400 x 532 float32 logits (81 MiB); chunks of 10 hold a
    # tenth of them at a time (memory, not time). The rise is above the process's earlier peak (its imports), so
    # only part of the 81 MiB shows: at least a quarter
    rows = bench_segm.main(["--num_queries", "100", "--height", "400", "--width", "532"])
    assert [r["variant"] for r in rows] == list(bench_segm.VARIANTS)
    all_at_once, chunked, above_threshold = (r["peak_mib"] for r in rows)
    assert all_at_once >= 100 * 400 * 532 * 4 / 2 ** 20 / 4
    # chunked, with or without a score threshold, well under the original's way; between the two chunked variants
    # the allocator's reuse varies by tens of MiB from run to run at this size (CI once measured 44 and 64 MiB)
    assert chunked < all_at_once / 2
    assert above_threshold < all_at_once / 2
    assert "ratio" in capsys.readouterr().out


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
    from tools.benchmarks import recipe as bench_recipe

    generate(tmp_path / "data", num_train=16, num_val=2, seed=0)
    text = bench_recipe.main(["--coco_path", str(tmp_path / "data"), "--flop_batches", "1", "--timed_steps", "1",
                              "--repeats", "1"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "x |" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(bench_recipe.RECIPES)
    assert rows[0].split(" | ")[4] == "1.000x"
    # today's recipe: 6 decoder layers and a 1-block trunk, fewer FLOPs per iteration than the first
    first, today = (float(r.split(" | ")[1]) for r in (rows[0], rows[-1]))
    assert 0.4 < today / first < 0.7
