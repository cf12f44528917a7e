"""LARS of the official linear probe (MoCo v3): steps by hand and a torch re-implementation (run in
the PyTorch reference interpreter)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mae_jax.training.lars import lars


def _step(opt, params, grads, state=None):
  state = opt.init(params) if state is None else state
  updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_first_step_by_hand():
  params = {"head": {"kernel": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "bias": jnp.array([1.0, 2.0])}}
  grads = {"head": {"kernel": jnp.array([[0.0, 6.0], [8.0, 0.0]]), "bias": jnp.array([0.5, -0.5])}}
  new, _ = _step(lars(learning_rate=2.0, momentum=0.9), params, grads)
  # ||p|| = 5, ||g|| = 10: g * 0.001 * 5 / 10 = [[0, 3e-3], [4e-3, 0]]; mu = g; p -= 2 * mu.
  np.testing.assert_allclose(new["head"]["kernel"], [[3.0, -6e-3], [-8e-3, 4.0]], rtol=1e-6)
  # The bias (1-D) is neither decayed nor rescaled: p -= 2 * g.
  np.testing.assert_allclose(new["head"]["bias"], [0.0, 3.0], rtol=1e-6)


def test_weight_decay_momentum_and_schedule_against_numpy():
  rng = np.random.default_rng(0)
  w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=(4,))
  grads = [(rng.normal(size=(3, 4)), rng.normal(size=(4,))) for _ in range(3)]
  lrs, wd, momentum, trust = [0.5, 1.0, 0.25], 0.1, 0.9, 0.001

  w, b, mu_w, mu_b = w0.copy(), b0.copy(), np.zeros_like(w0), np.zeros_like(b0)
  for lr, (gw, gb) in zip(lrs, grads):
    gw = gw + wd * w
    gw = gw * trust * np.linalg.norm(w) / np.linalg.norm(gw)
    mu_w, mu_b = momentum * mu_w + gw, momentum * mu_b + gb
    w, b = w - lr * mu_w, b - lr * mu_b

  opt = lars(lambda count: jnp.asarray(lrs)[count], weight_decay=wd, momentum=momentum)
  params = {"kernel": jnp.asarray(w0, jnp.float32), "bias": jnp.asarray(b0, jnp.float32)}
  state = opt.init(params)
  for gw, gb in grads:
    params, state = _step(opt, params, {"kernel": jnp.asarray(gw, jnp.float32),
                                        "bias": jnp.asarray(gb, jnp.float32)}, state)
  np.testing.assert_allclose(params["kernel"], w, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(params["bias"], b, rtol=1e-5, atol=1e-7)


def test_zero_norms_use_ratio_one():
  zero_param = {"kernel": jnp.zeros((2, 2))}
  grad = {"kernel": jnp.array([[1.0, -2.0], [0.5, 0.0]])}
  new, _ = _step(lars(learning_rate=0.1), zero_param, grad)
  np.testing.assert_allclose(new["kernel"], -0.1 * grad["kernel"], rtol=1e-6)
  params = {"kernel": jnp.ones((2, 2))}
  new, _ = _step(lars(learning_rate=0.1), params, {"kernel": jnp.zeros((2, 2))})
  np.testing.assert_array_equal(new["kernel"], params["kernel"])


def test_torch_one_dim_rule_and_mask_override():
  # A Flax bias may have several axes (the fused qkv bias is (3, heads, head_dim)); it is 1-D in
  # torch, so LARS leaves it alone.
  params = {"qkv": {"bias": jnp.ones((3, 2)), "kernel": jnp.ones((2, 3))}}
  grads = {"qkv": {"bias": jnp.full((3, 2), 2.0), "kernel": jnp.full((2, 3), 2.0)}}
  new, _ = _step(lars(learning_rate=1.0), params, grads)
  np.testing.assert_allclose(new["qkv"]["bias"], -1.0)
  np.testing.assert_allclose(new["qkv"]["kernel"], 1.0 - 0.001, rtol=1e-6)  # ||p||/||g|| = 1/2
  mask = {"qkv": {"bias": True, "kernel": False}}
  new, _ = _step(lars(learning_rate=1.0, mask=mask), params, grads)
  np.testing.assert_allclose(new["qkv"]["bias"], 1.0 - 0.001, rtol=1e-6)
  np.testing.assert_allclose(new["qkv"]["kernel"], -1.0)


@pytest.mark.slow
def test_matches_torch_reimplementation(torch_ref):
  """The official util/lars.py re-typed in torch (tests/torch_side.py), step for step."""
  rng = np.random.default_rng(1)
  init = {"kernel": rng.normal(size=(6, 5)).astype(np.float32),
          "bias": rng.normal(size=(5,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in init.items()}
           for _ in range(5)]
  lrs, wd = [0.1, 0.4, 0.8, 0.6, 0.2], 1e-2

  theirs = torch_ref.call("lars", init=init, grads=grads, lrs=lrs, weight_decay=wd)
  opt = lars(lambda count: jnp.asarray(lrs)[count], weight_decay=wd)
  params = jax.tree.map(jnp.asarray, init)
  state, update = opt.init(params), jax.jit(opt.update)
  for g in grads:
    updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
  assert sorted(theirs) == sorted(init)
  for k, p in theirs.items():
    np.testing.assert_allclose(params[k], p, rtol=1e-5, atol=1e-6, err_msg=k)
