"""Weighted k-nearest-neighbour classifier on frozen features (the InstDisc / DINO kNN monitor).

Features are L2-normalised, similarity is the cosine; each of the k nearest training examples votes
for its label with weight exp(similarity / T), and the class with the largest summed vote wins.
Queries are processed in chunks so only a (chunk, num_train) similarity block is ever in memory.
"""
import functools

import jax
import jax.numpy as jnp


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def knn_scores(train_features: jax.Array, train_labels: jax.Array, query_features: jax.Array,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               chunk_size: int = 256) -> jax.Array:
  """Summed votes (num_queries, num_classes): sum over the k most similar training examples of
  one_hot(label) * exp(cosine / temperature)."""
  train = _normalize(train_features)
  labels = train_labels.astype(jnp.int32)
  k = min(k, train.shape[0])
  num_queries = query_features.shape[0]
  chunk_size = max(1, min(chunk_size, num_queries))
  num_chunks = -(-num_queries // chunk_size)
  queries = _normalize(query_features)
  queries = jnp.pad(queries, ((0, num_chunks * chunk_size - num_queries), (0, 0)))

  def votes(chunk):
    sim = jnp.einsum("qd,nd->qn", chunk, train, precision=jax.lax.Precision.HIGHEST)
    top_sim, top_idx = jax.lax.top_k(sim, k)
    weights = jnp.exp(top_sim / temperature)
    one_hot = jax.nn.one_hot(labels[top_idx], num_classes, dtype=jnp.float32)
    return jnp.einsum("qk,qkc->qc", weights, one_hot)

  scores = jax.lax.map(votes, queries.reshape(num_chunks, chunk_size, -1))
  return scores.reshape(num_chunks * chunk_size, num_classes)[:num_queries]


def knn_predict(train_features: jax.Array, train_labels: jax.Array, query_features: jax.Array,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk_size: int = 256) -> jax.Array:
  """Predicted labels (num_queries,) of the weighted k-NN vote (ties go to the lower class id)."""
  scores = knn_scores(train_features, train_labels, query_features, num_classes, k, temperature,
                      chunk_size)
  return jnp.argmax(scores, axis=-1)


def knn_accuracy(train_features: jax.Array, train_labels: jax.Array, query_features: jax.Array,
                 query_labels: jax.Array, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 256) -> float:
  """Top-1 accuracy (fraction in [0, 1]) of `knn_predict` on labelled queries."""
  preds = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature,
                      chunk_size)
  return float(jnp.mean(preds == jnp.asarray(query_labels)))
