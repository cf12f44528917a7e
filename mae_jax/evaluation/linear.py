"""A linear classifier on fixed features (a frozen encoder's tokens, or raw pixels), trained to
convergence: the features are standardised with the train split's statistics (what the official
probe's BatchNorm without affine does), then softmax regression with a small L2 penalty runs Adam
over shuffled mini-batches on a cosine schedule, for a fixed number of steps whatever the split's
size. The problem is convex, so the score measures the
features rather than a tuned recipe, and the same function scores the encoder and the pixels.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _fit(x, y, num_classes: int, epochs: int, batch_size: int, lr: float, l2: float, seed: int):
  steps_per_epoch = x.shape[0] // batch_size
  tx = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}

  def loss_fn(params, xb, yb):
    logits = xb @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  def step(carry, idx):
    params, opt = carry
    grads = jax.grad(loss_fn)(params, x[idx], y[idx])
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), None

  def epoch(e, carry):
    order = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), e), x.shape[0])
    batches = order[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
    return jax.lax.scan(step, carry, batches)[0]

  params, _ = jax.lax.fori_loop(0, epochs, epoch, (params, tx.init(params)))
  return params


def linear_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                    steps: int = 2000, batch_size: int = 1000, lr: float = 1e-3,
                    l2: float = 1e-4, seed: int = 0) -> float:
  """Top-1 (fraction) on the test features of the linear classifier fitted on the train ones."""
  train = np.asarray(train_features, np.float32)
  mean, std = train.mean(0), train.std(0) + 1e-6
  standardise = lambda f: jnp.asarray((np.asarray(f, np.float32) - mean) / std)
  batch_size = min(batch_size, len(train))
  epochs = -(-steps // (len(train) // batch_size))
  params = _fit(standardise(train), jnp.asarray(train_labels, jnp.int32), num_classes, epochs,
                batch_size, lr, l2, seed)
  logits = standardise(test_features) @ params["w"] + params["b"]
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test_labels)))
