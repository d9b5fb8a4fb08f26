"""Devices and precision for the heads: the stacked optimiser, bf16 autocast, device-generic training, CLI options."""

from dataclasses import replace

import pytest
import torch

import fusion.device as device_module
import fusion.heads.optim as optim
from fusion.errors import FusionError
from fusion.heads.config import FitConfig, config_from_dict
from fusion.device import autocast, check_precision, resolve_device
from fusion.heads.optim import lr_runs
from fusion.heads.train import train_head, train_many
from adam_reference import assert_steps_like_torch_adam
from synthetic import gaussian_features, xor_features

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(proj_dim=32, hidden=32, batch_size=64)
SMALL_SIZES = {"train": 300, "val": 100, "test": 100}


@pytest.mark.parametrize("fused", [True, False])
def test_batched_adam_follows_torch_adam_with_transposed_gradients_and_shared_learning_rates(fused):
    """Autograd hands back transposed (non-contiguous) gradients for weights used as W^T in a batched matmul; the
    fused kernel reads memory in order, so they must be made dense first. Neighbouring models share learning rates,
    as a head's models do in the paper's grid, so the fused path steps several models per call."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (5,)}
    models = [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()} for _ in range(4)]
    lrs = [1e-2, 1e-2, 0.3, 1e-3]

    def transposed_grads():
        for _ in range(10):
            grads = [torch.randn(4, 3, 4, generator=generator).transpose(1, 2), torch.randn(4, 5, generator=generator)]
            assert not grads[0].is_contiguous()
            yield grads

    assert_steps_like_torch_adam(shapes, models, lrs, fused, transposed_grads())


def test_lr_runs_group_neighbours_only():
    assert lr_runs([1e-2, 1e-2, 1e-3, 1e-2]) == [(0, 2, 1e-2), (2, 3, 1e-3), (3, 4, 1e-2)]
    assert lr_runs([]) == []


def test_fused_and_vectorised_optimisers_train_alike(monkeypatch):
    """The whole trainer with either Adam path: the same trajectories up to float rounding (lr 1e-3: not chaotic)."""
    features = xor_features(SMALL_SIZES)
    configs = [FitConfig(head=h, lr=1e-3, dropout=0.0, epochs=3, **FAST) for h in ("self_attn", "dual_attn")]
    fused = train_many(features, configs)
    monkeypatch.setattr(optim, "has_fused_adam", lambda device_type: False)
    vectorised = train_many(features, configs)
    for first, second in zip(fused, vectorised):
        for name, tensor in first.state_dict.items():
            torch.testing.assert_close(tensor, second.state_dict[name], rtol=1e-4, atol=1e-5)


def test_bf16_trains_matmuls_in_bf16_with_fp32_weights_and_state(monkeypatch):
    import fusion.heads.models as models
    import fusion.heads.train as train

    features, bayes = gaussian_features({"train": 600, "val": 300, "test": 300})
    config = FitConfig(head="self_attn", lr=3e-3, dropout=0.0, loss="ce", epochs=8, metric="accuracy", **FAST)
    products, logits_seen = set(), set()
    real_linear, real_forward = models.stacked_linear, train.head_forward

    def product_spy(x, weight, bias=None):
        products.add((x.dtype, weight.dtype))
        return real_linear(x, weight, bias)

    def forward_spy(*args, **kwargs):
        logits = real_forward(*args, **kwargs)
        logits_seen.add(logits.dtype)
        return logits

    monkeypatch.setattr(models, "stacked_linear", product_spy)
    monkeypatch.setattr(train, "head_forward", forward_spy)
    fp32, bf16 = train_many(features, [config, replace(config, precision="bf16")])  # two passes: never stacked
    assert products == {(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)}
    assert logits_seen == {torch.float32}  # the loss reads fp32 logits in both
    assert all(t.dtype == torch.float32 for t in bf16.state_dict.values())
    assert not torch.equal(fp32.state_dict["fusion.qkv.weight"], bf16.state_dict["fusion.qkv.weight"])
    assert abs(fp32.val["accuracy"] - bf16.val["accuracy"]) <= 0.03 and bf16.test["accuracy"] > bayes - 0.05
    assert bf16.config.precision == "bf16" and bf16.device == "cpu"


def test_fp32_stays_bit_reproducible_and_an_explicit_cpu_device_changes_nothing():
    features = xor_features(SMALL_SIZES)
    config = FitConfig(head="dual_attn", epochs=3, **FAST)
    first, second = train_head(features, config), train_head(features, config, device="cpu")
    assert first.history == second.history
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)


def test_autocast_is_no_context_at_all_in_fp32():
    with autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_devices_resolve_and_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(FusionError, match="sees no CUDA device"):
            resolve_device(name)
    with pytest.raises(FusionError, match="unknown device"):
        resolve_device("tpu")


def test_bf16_on_a_cpu_without_bf16_units_is_refused(monkeypatch):
    monkeypatch.setattr(device_module, "bf16_units", lambda: "none")
    with pytest.raises(FusionError, match="emulated"):
        check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))
    check_precision("bf16", torch.device("cuda"))
    monkeypatch.setattr(device_module, "bf16_units", lambda: "avx512_bf16")
    check_precision("bf16", torch.device("cpu"))


def test_configs_saved_before_precision_existed_load_as_fp32():
    values = {k: v for k, v in FitConfig(precision="bf16").__dict__.items() if k != "precision"}
    assert config_from_dict(values).precision == "fp32"
    with pytest.raises(FusionError, match="precision"):
        FitConfig(precision="fp16")


def test_grid_rows_logged_before_precision_existed_count_as_done(tmp_path, monkeypatch):
    import json

    import fusion.heads.search.grid as grid_module
    from fusion.heads.search.grid import run_grid
    from fusion.heads.search.configs import grid_configs

    features = xor_features(SMALL_SIZES)
    configs = grid_configs(FitConfig(epochs=2, **FAST), heads=["basic"], lrs=[1e-3], dropouts=[0.0], losses=["ce"])
    run_grid(features, configs, tmp_path)
    log = tmp_path / "results.jsonl"
    row = json.loads(log.read_text())
    del row["config"]["precision"]
    log.write_text(json.dumps(row) + "\n")
    monkeypatch.setattr(grid_module, "train_many", lambda *a, **k: pytest.fail("retrained a finished row"))
    rows = run_grid(features, configs, tmp_path)
    assert rows[0]["config"]["precision"] == "fp32"


@pytest.fixture()
def cache_file(tmp_path):
    from cache_fixtures import write_synthetic_cache

    return write_synthetic_cache(tmp_path / "synthetic.h5", (60, 20, 20), dt=12, di=8, seed=4)


def test_fit_records_bf16_and_refuses_what_cannot_run_in_one_line(cache_file, tmp_path, capsys, monkeypatch):
    from fusion.cli import main
    from fusion.heads.checkpoint import load_run

    monkeypatch.setattr(device_module, "bf16_units", lambda: "avx512_bf16")  # bf16 runs on any CPU, slowly
    run = tmp_path / "run"
    assert main(["fit", "--cache", str(cache_file), "--head", "basic", "--epochs", "2", "--batch-size", "16",
                 "--precision", "bf16", "--device", "cpu", "--out", str(run)]) == 0
    assert load_run(run).config.precision == "bf16"
    assert main(["report", "--run", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| precision | `bf16` |" in report and "our choice where the paper is silent" in report
    capsys.readouterr()
    monkeypatch.setattr(device_module, "bf16_units", lambda: "none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in ((["--precision", "bf16"], "emulated"), (["--device", "cuda"], "no CUDA device"),
                          (["--precision", "fp16"], "precision")):
        for command in ("fit", "grid"):
            code = main([command, "--cache", str(cache_file), "--out", str(tmp_path / command), *argv])
            error = capsys.readouterr().err
            assert code == 1 and error.count("\n") == 1 and message in error, (command, argv, error)
