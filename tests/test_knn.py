"""Weighted k-NN monitor: exactness on separable data, the exp(sim / T) weighting, chunking."""
import json

import jax
import numpy as np
import pytest

from mae_jax import data, models

from mae_jax.evaluation.knn import knn_accuracy, knn_predict, knn_scores
from tests.helpers import tiny_config


def _reference_scores(train, labels, queries, num_classes, k, temperature):
  """Brute force in float64: cosine similarity, k largest, one vote exp(sim / T) each."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  scores = np.zeros((len(queries), num_classes))
  for q, query in enumerate(queries):
    sim = train @ query
    for i in np.argsort(-sim)[:k]:
      scores[q, labels[i]] += np.exp(sim[i] / temperature)
  return scores


def test_separable_clusters_are_classified_exactly():
  rng = np.random.default_rng(0)
  centers = np.eye(8)[:3] * 10.0
  labels = np.repeat(np.arange(3), 10)
  train = centers[labels] + rng.normal(size=(30, 8))
  query_labels = np.array([2, 0, 1, 1, 0, 2, 2])
  queries = centers[query_labels] + rng.normal(size=(7, 8))
  # 7 queries in chunks of 3: the last chunk is padded.
  preds = knn_predict(train, labels, queries, num_classes=3, k=5, chunk_size=3)
  np.testing.assert_array_equal(preds, query_labels)
  assert knn_accuracy(train, labels, queries, query_labels, num_classes=3, k=5) == 1.0
  wrong = (query_labels + 1) % 3
  assert knn_accuracy(train, labels, queries, wrong, num_classes=3, k=5) == 0.0


def test_similarity_weighting_beats_majority():
  # One very close neighbour of class 0 against two farther ones of class 1.
  query = np.array([[1.0, 0.0]])
  angle = np.deg2rad(40.0)
  train = np.array([[1.0, 0.02], [np.cos(angle), np.sin(angle)], [np.cos(angle), -np.sin(angle)],
                    [-1.0, 0.0]])
  labels = np.array([0, 1, 1, 2])
  # T = 0.07: exp(~1/0.07) = 1.6e6 against 2 * exp(0.766/0.07) = 1.1e5: class 0 wins.
  assert int(knn_predict(train, labels, query, num_classes=3, k=3)[0]) == 0
  # A large temperature makes every vote ~1: the majority (class 1) wins.
  assert int(knn_predict(train, labels, query, num_classes=3, k=3, temperature=100.0)[0]) == 1
  scores = np.asarray(knn_scores(train, labels, query, num_classes=3, k=3))
  sims = train[:3] @ query[0] / np.linalg.norm(train[:3], axis=1)
  np.testing.assert_allclose(scores[0], [np.exp(sims[0] / 0.07),
                                         np.exp(sims[1] / 0.07) + np.exp(sims[2] / 0.07), 0.0],
                             rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_scores_match_brute_force(chunk_size):
  rng = np.random.default_rng(1)
  train, labels = rng.normal(size=(50, 6)), rng.integers(0, 4, size=50)
  queries = rng.normal(size=(13, 6)) * 3.0  # feature scale must not matter (cosine)
  scores = np.asarray(knn_scores(train, labels, queries, num_classes=4, k=5, temperature=0.5,
                                 chunk_size=chunk_size))
  np.testing.assert_allclose(scores, _reference_scores(train, labels, queries, 4, 5, 0.5),
                             rtol=1e-4)


def test_k_larger_than_train_set_uses_all():
  train, labels = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])
  scores = np.asarray(knn_scores(train, labels, np.array([[1.0, 1.0]]), num_classes=2, k=20))
  np.testing.assert_allclose(scores[0], np.exp(np.sqrt(0.5) / 0.07) * np.ones(2), rtol=1e-4)


@pytest.mark.slow
def test_monitor_scores_the_configured_subsets_during_pretraining(tmp_path):
  from mae_jax.evaluation import knn_monitor
  from mae_jax.training.tasks import pretrain
  from mae_jax import sharding
  from mae_jax.training import trainer
  config = tiny_config(**{"total_steps": 4, "knn.every_steps": 2, "knn.num_train": 50,
                          "knn.num_eval": 40})
  workdir = tmp_path / "run"
  trainer.run(config, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  knn_records = [r for r in records if "knn_top1" in r]
  assert [r["step"] for r in knn_records] == [2, 4]
  assert all(0.0 <= r["knn_top1"] <= 1.0 for r in knn_records)
  # The raw-pixel baseline sits beside every encoder score, computed by the monitor: the same vote
  # on the flattened normalised pixels of the same 50 train / 40 eval images.
  pixels = [r["knn_top1_pixels"] for r in knn_records]
  assert pixels[0] == pixels[1]
  train_it = data.create_iterator(config.data, split="train", global_batch_size=64,
                                  preprocess=data.eval_preprocess(config.data))
  eval_it = data.create_iterator(config.data, global_batch_size=64,
                                 preprocess=data.eval_preprocess(config.data))
  train_batch, eval_batch = jax.device_get(next(train_it)), jax.device_get(next(eval_it))
  flat = lambda b, n: (np.asarray(b["image"][:n]).reshape(n, -1), np.asarray(b["label"][:n]))
  expected = knn_accuracy(*flat(train_batch, 50), *flat(eval_batch, 40), 10, k=config.knn.k,
                          temperature=config.knn.temperature)
  assert pixels[0] == pytest.approx(expected, abs=1e-6)

  # 50 train / 40 eval examples from batches of 32: partial batches are cut to the count, and the
  # labels are those of the first examples of each split, in order.
  model = pretrain.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  params = models.init_params(model, jax.random.key(0))
  monitor = knn_monitor.KnnMonitor(model, config, mesh)
  features, labels = monitor.embed(params, "train", 50, knn_monitor.FEATURES)
  dim, patches = model.embed_dim, model.num_patches
  assert {f: v.shape for f, v in features.items()} == {
      "cls": (50, dim), "mean": (50, dim), "tokens": (50, patches * dim)}
  assert all(np.all(np.isfinite(v)) for v in features.values())
  it = data.create_iterator(config.data, split="train", global_batch_size=64,
                                  preprocess=data.eval_preprocess(config.data))
  first = jax.device_get(next(it))
  np.testing.assert_array_equal(labels, np.asarray(first["label"])[:50])
  # One encoder pass gives all three: the cls token, the patch mean, the patch tokens in order.
  tokens = np.asarray(model.apply({"params": params}, first["image"][:50], method=model.encode))
  np.testing.assert_allclose(features["cls"], tokens[:, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(features["mean"], tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(features["tokens"], tokens[:, 1:].reshape(50, -1), rtol=1e-5,
                             atol=1e-5)
  assert monitor.embed(params, None, 40, ("cls",))[0]["cls"].shape == (40, dim)
  by_feature = monitor.scores_by_feature(params, with_linear=False)
  assert set(by_feature) == set(knn_monitor.FEATURES)
  assert by_feature["cls"] == monitor.scores(params, with_linear=False)
  # The random-init floor is the encoder pre-training started from (the run's seed, 0 here), scored
  # the same way, and sits beside every encoder score too.
  random_init = [r["knn_top1_random_init"] for r in knn_records]
  assert random_init[0] == random_init[1]
  assert random_init[0] == pytest.approx(monitor.scores(params, with_linear=False)["knn_top1"],
                                         abs=1e-6)


def test_summary_sets_the_encoder_against_random_init_and_pixels():
  from mae_jax.evaluation import knn_monitor
  cfg = tiny_config(**{"knn.feature": "tokens"}).knn
  last = {"knn_top1": 0.86, "knn_top1_pixels": 0.85, "knn_top1_random_init": 0.83,
          "linear_top1": 0.89, "linear_top1_pixels": 0.84, "linear_top1_random_init": 0.87}
  lines = knn_monitor.summary(last, cfg)
  assert "all patch tokens" in lines[0] and f"{cfg.num_train} train" in lines[0]
  assert lines[1] == "  knn top-1: encoder 86.00%, random init 83.00%, raw pixels 85.00%"
  assert lines[2] == "  linear top-1: encoder 89.00%, random init 87.00%, raw pixels 84.00%"
  assert "beats both" in lines[3]
  assert "not the raw pixels" in knn_monitor.summary({**last, "knn_top1": 0.84}, cfg)[3]
  assert "does not beat its random init" in knn_monitor.summary(
      {**last, "linear_top1": 0.86}, cfg)[3]
  assert knn_monitor.summary({"loss": 1.0}, cfg) == []


@pytest.mark.parametrize("field,value", [("every_steps", -1), ("k", 0), ("feature", "pooled")])
def test_monitor_config_errors_name_the_field(field, value):
  from mae_jax.configs import pretrain as pretrain_config
  from mae_jax.evaluation import knn_monitor
  cfg = pretrain_config.get_config("fashion_mnist").knn
  cfg[field] = value
  with pytest.raises(ValueError, match=f"config.knn.{field}"):
    knn_monitor.check_config(cfg)
