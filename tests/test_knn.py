"""Weighted k-NN monitor: exactness on separable data, the exp(sim / T) weighting, chunking."""
import numpy as np
import pytest

from mae_jax.evaluation.knn import knn_accuracy, knn_predict, knn_scores


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
