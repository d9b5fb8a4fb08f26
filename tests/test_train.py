"""The training loop, its vectorisation across configs, early stopping, the optimizer and run directories."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from fusion.errors import FusionError, RunError
from fusion.heads.checkpoint import load_run, save_run
from fusion.heads.config import FitConfig
from fusion.heads.features import Modality, SplitFeatures
from fusion.heads.metrics import classification_metrics
from fusion.heads.models import build_head, predict_proba
from fusion.heads.train import train_head, train_many
from adam_reference import assert_steps_like_torch_adam
from synthetic import gaussian_features, token_split, xor_features



pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(proj_dim=32, hidden=32, batch_size=64)
SMALL_SIZES = {"train": 300, "val": 100, "test": 100}


def _test_logits(result, features):
    head = build_head(result.config, features["test"].text.dim, features["test"].image.dim, params=result.state_dict)
    return head.eval()(features["test"].text, features["test"].image)


def test_fusion_heads_solve_xor_that_neither_modality_can():
    features = xor_features({"train": 2000, "val": 400, "test": 600})
    heads = ["basic", "self_attn", "dual_attn", "text_only", "image_only"]
    configs = [FitConfig(head=h, lr=3e-3, dropout=0.0, loss="ce", epochs=60, patience=10, metric="accuracy", **FAST)
               for h in heads]
    accuracy = {c.head: r.test["accuracy"] for c, r in zip(configs, train_many(features, configs))}
    assert min(accuracy[h] for h in heads[:3]) > 0.9, accuracy
    assert max(accuracy["text_only"], accuracy["image_only"]) < 0.7, accuracy


def test_heads_approach_bayes_optimal_accuracy():
    features, bayes = gaussian_features({"train": 2400, "val": 600, "test": 1000})
    configs = [FitConfig(head=h, lr=3e-3, dropout=0.0, loss="ce", epochs=40, patience=8, metric="accuracy", **FAST)
               for h in ("basic", "self_attn", "dual_attn")]
    for config, result in zip(configs, train_many(features, configs)):
        assert bayes - 0.03 <= result.test["accuracy"] <= bayes + 0.02, (config.head, result.test, bayes)


def _mixed_configs():
    base = FitConfig(head="self_attn", epochs=6, patience=2, **FAST)
    return [base, replace(base, lr=1e-2, dropout=0.5), replace(base, loss="ce", dropout=0.0, epochs=3),
            replace(base, gamma=3.0, alpha=(2.0, 1.0, 0.5), metric="accuracy"), replace(base, lr=1e-4, patience=1),
            replace(base, seed=7), replace(base, head="basic", dropout=0.0), replace(base, batch_size=50)]


@pytest.mark.parametrize("tokens", [False, True])
def test_train_many_equals_training_each_alone(tokens):
    if tokens:
        features = {s: token_split(n, 4, 3, seed=i) for i, (s, n) in enumerate(SMALL_SIZES.items())}
        configs = [replace(c, head="dual_attn") for c in _mixed_configs()[:4]]
    else:
        features, configs = xor_features(SMALL_SIZES), _mixed_configs()
    calls = []
    together = train_many(features, configs, on_epoch=lambda epoch, index, metrics: calls.append((index, metrics)))
    assert len(calls) == sum(r.epochs_run for r in together)
    for index, (config, grouped) in enumerate(zip(configs, together)):
        alone = train_head(features, config)
        assert grouped.config == config and (grouped.best_epoch, grouped.epochs_run) == (alone.best_epoch,
                                                                                         alone.epochs_run)
        _assert_same_metrics(grouped.val, alone.val)
        _assert_same_metrics(grouped.test, alone.test)
        assert [m for i, m in calls if i == index] == grouped.history
        torch.testing.assert_close(_test_logits(grouped, features), _test_logits(alone, features), rtol=1e-4,
                                   atol=1e-4)


def test_a_group_over_the_memory_budget_trains_in_several_passes_to_the_same_results(monkeypatch):
    import fusion.heads.train as train

    features = {s: token_split(n, 4, 3, seed=i) for i, (s, n) in enumerate(SMALL_SIZES.items())}
    configs = [replace(c, head="dual_attn") for c in _mixed_configs()[:4]]  # one group: same head, seed, sizes
    per_model = train.bytes_per_model(configs[0], features)
    assert train.models_per_pass(configs[0], features, 2 * per_model) == 2
    assert train.models_per_pass(replace(configs[0], head="basic"), features, 2 * per_model) > 2  # 2 tokens a row
    passes, real_pass = [], train._Pass

    def counted(features, group, *rest):
        passes.append(len(group))
        return real_pass(features, group, *rest)

    monkeypatch.setattr(train, "_Pass", counted)
    split = train_many(features, configs, memory_budget=2 * per_model)
    whole = train_many(features, configs, memory_budget=1 << 40)
    assert passes == [2, 2, 4]
    for first, second in zip(split, whole):
        assert (first.best_epoch, first.epochs_run) == (second.best_epoch, second.epochs_run)
        _assert_same_metrics(first.val, second.val)
        _assert_same_metrics(first.test, second.test)


def _assert_same_metrics(first: dict, second: dict) -> None:
    """Metrics from predictions equal; losses equal up to float rounding (batched GEMMs sum in another order)."""
    assert {k: v for k, v in first.items() if k != "loss"} == {k: v for k, v in second.items() if k != "loss"}
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-4)


def test_same_seed_is_deterministic_and_the_seed_matters():
    features = xor_features(SMALL_SIZES)
    config = FitConfig(head="dual_attn", epochs=3, **FAST)
    first, second = train_head(features, config), train_head(features, config)
    assert first.history == [dict(h) for h in second.history] and first.test == second.test
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    other = train_head(features, replace(config, seed=1))
    assert not torch.equal(first.state_dict["text_proj.weight"], other.state_dict["text_proj.weight"])


def test_early_stopping_keeps_the_best_epochs_weights():
    features = xor_features(SMALL_SIZES)
    result = train_head(features, FitConfig(head="basic", lr=3e-2, epochs=30, patience=3, **FAST))
    scores = [entry["macro_f1"] for entry in result.history]
    assert result.best_epoch == scores.index(max(scores)) + 1
    assert len(result.history) == result.epochs_run == min(30, result.best_epoch + 3)
    assert [entry["epoch"] for entry in result.history] == list(range(1, result.epochs_run + 1))
    head = build_head(result.config, 6, 4, params=result.state_dict)
    predictions = predict_proba(head, features["val"].text, features["val"].image).argmax(dim=1)
    restored = classification_metrics(features["val"].label.numpy(), predictions.numpy())
    assert restored == {k: v for k, v in result.val.items() if k != "loss"}
    assert set(result.history[0]) == {"epoch", "train_loss", "val_loss", "accuracy", "macro_f1", "weighted_f1",
                                      "per_class_f1"}


@pytest.mark.parametrize("fused", [True, False])
def test_batched_adam_is_torch_adam_with_a_learning_rate_per_model(fused):
    generator = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (5,)}
    models = [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()} for _ in range(3)]
    lrs = [1e-2, 1e-3, 0.3]

    def grads_with_a_zero():
        for _ in range(15):
            grads = [torch.randn(3, *shape, generator=generator) for shape in shapes.values()]
            grads[1][:, 0] = 0.0  # a parameter that gets no gradient stays put, as in torch
            yield grads

    assert_steps_like_torch_adam(shapes, models, lrs, fused, grads_with_a_zero())


def test_threads_are_restored_and_bad_features_refused():
    features = xor_features({"train": 64, "val": 32})
    before = torch.get_num_threads()
    result = train_head(features, FitConfig(head="text_only", epochs=1, **FAST), threads=2)
    assert torch.get_num_threads() == before and result.test is None
    with pytest.raises(FusionError, match="val"):
        train_head({"train": features["train"]}, FitConfig())
    broken = features["train"]
    bad = {"train": SplitFeatures(broken.text, broken.image, broken.label + 5), "val": features["val"]}
    with pytest.raises(FusionError, match="labels outside"):
        train_head(bad, FitConfig())


# ---------- run directories ----------

@pytest.fixture(scope="module")
def trained():
    features = xor_features(SMALL_SIZES)
    return features, train_head(features, FitConfig(head="dual_attn", epochs=2, alpha=(1.0, 2.0, 1.0), **FAST))


def _save(tmp_path, result):
    return save_run(tmp_path / "run", result, cache_path="cache.h5", fingerprint="abc", dims=(6, 4))


def test_run_round_trip(tmp_path, trained):
    features, result = trained
    run = load_run(_save(tmp_path, result))
    assert run.config == result.config and not run.head.training
    assert run.meta["cache_fingerprint"] == "abc" and run.meta["text_dim"] == 6
    assert run.metrics["test"] == result.test and len(run.metrics["history"]) == result.epochs_run
    assert set(run.metrics["val"]["per_class_f1"]) == {"negative", "neutral", "positive"}
    torch.testing.assert_close(run.head(features["test"].text, features["test"].image),
                               _test_logits(result, features), rtol=0, atol=0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "head.safetensors", "metrics.json",
                                                                    "test_predictions.json", "train_means.safetensors"]
    assert run.metrics["test"]["confusion_matrix"] == _confusion(run.head, features["test"])
    saved = json.loads((tmp_path / "run" / "test_predictions.json").read_text())
    assert saved["y_true"] == features["test"].label.tolist()
    assert saved["y_pred"] == predict_proba(run.head, features["test"].text, features["test"].image).argmax(1).tolist()


def _confusion(head, split):
    predictions = predict_proba(head, split.text, split.image).argmax(dim=1)
    counts = [[0] * 3 for _ in range(3)]
    for truth, guess in zip(split.label.tolist(), predictions.tolist()):
        counts[truth][guess] += 1
    return counts


def test_run_records_the_cache_description(tmp_path, trained):
    features = xor_features(SMALL_SIZES)
    ablation = train_head(features, FitConfig(head="image_only", epochs=1, **FAST))
    cache = {"path": "/data/mvsa.h5", "fingerprint": "f00d", "dataset": "mvsa-single", "text_model": "bert",
             "image_model": "dinov2", "max_length": 128}
    run = load_run(save_run(tmp_path / "ablation", ablation, cache=cache))
    assert run.cache == cache and run.meta["cache_path"] == "/data/mvsa.h5" and run.meta["cache_fingerprint"] == "f00d"
    assert (run.meta["text_dim"], run.meta["image_dim"]) == (0, 4)  # text unused by image_only, its size unknown
    torch.testing.assert_close(run.head(features["test"].text, features["test"].image),
                               _test_logits(ablation, features))


def test_diverged_losses_are_written_as_null(tmp_path, trained):
    diverged = replace(trained[1], history=[{**trained[1].history[0], "train_loss": float("nan")}],
                       val={**trained[1].val, "loss": float("inf")})
    metrics = load_run(_save(tmp_path, diverged)).metrics
    assert metrics["history"][0]["train_loss"] is None and metrics["val"]["loss"] is None


def test_altered_weights_are_refused(tmp_path, trained):
    run_dir = _save(tmp_path, trained[1])
    data = bytearray((run_dir / "head.safetensors").read_bytes())
    data[-1] ^= 0x01
    (run_dir / "head.safetensors").write_bytes(bytes(data))
    with pytest.raises(RunError, match="head.safetensors: altered"):
        load_run(run_dir)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(head="transformer"), "head 'transformer'"),
    (lambda c: c.update(lr="0.1"), "lr must be a finite number"),
    (lambda c: c.update(batch_size=1.5), "batch_size must be an integer"),
    (lambda c: c.update(colour="red"), "unknown key"),
    (lambda c: c.pop("head_sha256"), "missing key"),
    (lambda c: c.update(text_dim=7), "tensor text_proj.weight is"),
    (lambda c: c.update(head="basic"), "unexpected cross"),
])
def test_altered_config_is_refused(tmp_path, trained, edit, message):
    run_dir = _save(tmp_path, trained[1])
    config = json.loads((run_dir / "config.json").read_text())
    edit(config)
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match=message):
        load_run(run_dir)


def test_missing_damaged_and_mismatched_files_are_refused(tmp_path, trained):
    run_dir = _save(tmp_path, trained[1])
    (run_dir / "metrics.json").write_text("{not json")
    with pytest.raises(RunError, match="metrics.json: not valid JSON"):
        load_run(run_dir)
    (run_dir / "config.json").unlink()
    with pytest.raises(RunError, match="config.json: missing"):
        load_run(run_dir)
    with pytest.raises(RunError, match="not a run directory"):
        load_run(tmp_path / "nowhere")


def test_extra_tensor_is_refused_even_with_a_matching_hash(tmp_path, trained):
    import hashlib

    run_dir = _save(tmp_path, trained[1])
    save_file({**trained[1].state_dict, "spare": torch.zeros(2)}, str(run_dir / "head.safetensors"))
    config = json.loads((run_dir / "config.json").read_text())
    config["head_sha256"] = hashlib.sha256((run_dir / "head.safetensors").read_bytes()).hexdigest()
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="unexpected spare"):
        load_run(run_dir)


@pytest.mark.parametrize("tokens", [False, True])
def test_end_to_end_from_a_real_cache_file(tmp_path, tokens):
    """The cache reader's arrays -> features -> train -> run directory -> the same predictions."""
    from cache_fixtures import write_synthetic_cache
    from fusion.cache.reader import read_cache
    from fusion.heads.features import features_from_cache

    path = write_synthetic_cache(tmp_path / "cache.h5", (60, 20, 20), dt=16, di=24, tokens=tokens)
    features = features_from_cache(read_cache(path, tokens=tokens), tokens=tokens)
    assert features["train"].text.dim == 16 and (features["train"].text.tokens.shape[1] > 1) == tokens
    result = train_head(features, FitConfig(head="dual_attn", epochs=3, **FAST))
    run = load_run(save_run(tmp_path / "run", result, cache={"path": str(path), "fingerprint": "x"}))
    torch.testing.assert_close(run.head(features["test"].text, features["test"].image),
                               _test_logits(result, features))


def test_streamed_tokens_train_exactly_as_tokens_in_memory(tmp_path):
    """The minibatches read from disk are the rows the in-memory split would gather: same losses, same weights."""
    from cache_fixtures import write_synthetic_cache
    from fusion.heads.runs import load_features
    from fusion.heads.streamed import StreamedSplit

    path = write_synthetic_cache(tmp_path / "cache.h5", (61, 23, 19), dt=16, di=24, tokens=True)
    in_memory, _ = load_features(path, tokens=True)
    streamed, _ = load_features(path, tokens=True, stream=True)
    assert all(isinstance(split, StreamedSplit) for split in streamed.values())
    configs = [FitConfig(head=head, epochs=3, lr=lr, dropout=dropout, batch_size=16, proj_dim=8, hidden=8)
               for head in ("dual_attn", "basic") for lr, dropout in ((1e-2, 0.0), (1e-3, 0.5))]
    for expected, actual in zip(train_many(in_memory, configs), train_many(streamed, configs)):
        assert actual.history == expected.history and actual.test == expected.test
        for name, tensor in expected.state_dict.items():
            assert torch.equal(actual.state_dict[name], tensor), name


def test_a_paper_sized_dual_attn_pass_on_token_sequences_fits_a_few_gigabytes():
    """Feature-space attention projects no token, so 48 models at batch 256 on BERT- and DINOv2-shaped sequences
    (128 x 768 and 257 x 384 a row) budget tens of MB each, not the ~600 MB of projecting every token."""
    import fusion.heads.train as train

    rows = SplitFeatures(Modality(torch.zeros(1, 128, 768), torch.ones(1, 128, dtype=torch.bool)),
                         Modality(torch.zeros(1, 257, 384), torch.ones(1, 257, dtype=torch.bool)),
                         torch.zeros(1, dtype=torch.long))
    assert train.models_per_pass(FitConfig(head="dual_attn", batch_size=256), {"train": rows}, 4 << 30) >= 48
