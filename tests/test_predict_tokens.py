"""`fusion predict` on a head fitted with --tokens: the same token sequences as the cache it was trained on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dataset_writers import write_mvsa
from tiny_models import extract_argv

from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.errors import RunError
from fusion.heads.checkpoint import load_run, save_run
from fusion.heads.config import FitConfig
from fusion.heads.models import predict_proba
import fusion
from fusion.heads.runs import load_features
from fusion.heads.train import train_head
from fusion.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_models):
    """A dual_attn head fitted on the token sequences of a really extracted cache, and that cache's features."""
    folder = tmp_path_factory.mktemp("tokens")
    expected = write_mvsa(folder / "data", kind="single", n_per_class=6, dirty=False)
    cache = folder / "c.h5"
    assert main(extract_argv(expected.root, cache, tiny_models, "--tokens", "--batch-size", "4")) == 0
    features, meta = load_features(cache, tokens=True)
    result = train_head(features, FitConfig(head="dual_attn", epochs=2, batch_size=8, seed=0))
    run = save_run(folder / "run", result, cache=meta, tokens=True)
    return expected, cache, features, run


def _cached_posts(expected, cache, split: str) -> tuple[list, list[str]]:
    """The dataset's own posts (image files and texts as the reader gives them) of the cache's rows of `split`."""
    ids = read_cache(cache).splits[split].id
    return [expected.root / "data" / f"{id_}.jpg" for id_ in ids], [expected.texts[id_] for id_ in ids]


def _probabilities(answers: list[dict]) -> torch.Tensor:
    assert all("error" not in answer for answer in answers)
    return torch.tensor([[answer["probabilities"][name] for name in LABELS] for answer in answers])


def test_predict_feeds_a_token_trained_dual_attn_head_the_sequences_it_was_trained_on(token_run):
    expected, cache, features, run = token_run
    predictor = fusion.load_run(run, device="cpu")
    assert predictor.loaded.tokens is True and predictor.sequences is True
    images, texts = _cached_posts(expected, cache, "train")
    # Batches of 5 group the posts otherwise than extraction did (4, sorted by length): padding must not matter.
    predicted = _probabilities(predictor.predict(images, texts, batch_size=5, raw=True))
    train = features["train"]
    assert train.text.tokens.shape[1] > 1 and len(images) == len(train)
    trained_on = predict_proba(load_run(run).head, train.text, train.image)
    torch.testing.assert_close(predicted, trained_on.float(), atol=1e-3, rtol=0)
    predictor.sequences = False  # what predict did before runs recorded `tokens`
    pooled_only = _probabilities(predictor.predict(images, texts, batch_size=5, raw=True))
    assert (pooled_only - trained_on).abs().max() > 1e-2  # not what the head learnt on


def test_a_head_that_reads_token_0_only_is_given_pooled_vectors(token_run, tiny_models):
    expected, cache, _, _ = token_run
    features, meta = load_features(cache)
    run = save_run(cache.parent / "basic", train_head(features, FitConfig(head="basic", epochs=1)), cache=meta,
                   tokens=True)
    head = load_run(run).head
    predictor = fusion.load_run(run, device="cpu")
    assert predictor.sequences is False
    predicted = _probabilities(predictor.predict(*_cached_posts(expected, cache, "val"), raw=True))
    torch.testing.assert_close(predicted, predict_proba(head, features["val"].text, features["val"].image),
                               atol=1e-3, rtol=0)


def test_runs_written_before_the_tokens_key_load_as_pooled(token_run, tmp_path):
    run = shutil.copytree(token_run[3], tmp_path / "old")
    config = json.loads((run / "config.json").read_text())
    del config["tokens"]
    (run / "config.json").write_text(json.dumps(config))
    assert load_run(run).tokens is False


def test_a_tokens_value_that_is_not_a_boolean_is_refused_in_one_line(token_run, tmp_path):
    run = shutil.copytree(token_run[3], tmp_path / "bad")
    config = json.loads((run / "config.json").read_text())
    config["tokens"] = "yes"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError) as raised:
        load_run(run)
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and "tokens" in message and "'yes'" in message
