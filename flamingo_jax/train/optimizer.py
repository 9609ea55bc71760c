"""Optimisers of the paper (App. B.1.2-3), as optax transformations over the trainable params only.

Flamingo: AdamW, global-norm clipping at 1.0 on the accumulated gradient, weight decay 0.1 except the
Perceiver Resampler (0), learning rate warmed up linearly from 0 over `warmup_steps` then constant. `lr_multipliers`, a list of
(regex, factor), scales the step of the matching trainable params (e.g. the tanh gates on a short run).
Contrastive: Adam(W) with adaptive gradient clipping (AGC, Brock et al. 2021) on the NFNet's parameters.
"""

import re

import optax


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warm-up from 0 to `cfg.lr`, then constant (or cosine to 0 when `cfg.decay == 'cosine'`)."""
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.decay == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.decay == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - cfg.warmup_steps, 1))
  else:
    raise ValueError(f"optim.decay must be 'constant' or 'cosine', got {cfg.decay!r}")
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _path_mask(params, patterns, value_if_match: bool):
  """A params-shaped tree of bools: `value_if_match` where the path matches any pattern."""
  return {
    module: {
      name: (any(re.search(p, f"{module}/{name}") for p in patterns) == value_if_match) for name in leaves
    }
    for module, leaves in params.items()
  }


def make_optimizer(cfg, trainable_params) -> optax.GradientTransformation:
  """The optimiser for `trainable_params` from a config's `optim` section."""
  schedule = learning_rate_schedule(cfg)
  decay_mask = _path_mask(trainable_params, list(cfg.no_decay), value_if_match=False)
  parts = []
  if cfg.agc_clip > 0:
    agc = optax.adaptive_grad_clip(cfg.agc_clip)
    agc_mask = _path_mask(trainable_params, list(cfg.agc_on), value_if_match=True)
    parts.append(optax.masked(agc, agc_mask))
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(
    optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
  )
  for pattern, factor in cfg.lr_multipliers:
    mask = _path_mask(trainable_params, [pattern], value_if_match=True)
    if not any(any(leaves.values()) for leaves in mask.values()):
      raise ValueError(f"optim.lr_multipliers: {pattern!r} matches no trainable parameter")
    parts.append(optax.masked(optax.scale(float(factor)), mask))
  return optax.chain(*parts)
