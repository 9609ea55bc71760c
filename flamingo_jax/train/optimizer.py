"""Optimisers of the paper (App. B.1.2-3), as optax transformations over the trainable params only.

Flamingo: AdamW, global-norm clipping at 1.0 on the accumulated gradient, weight decay 0.1 except the
Perceiver Resampler (0), learning rate warmed up linearly from 0 over `warmup_steps` then constant. `lr_multipliers`, a list of
(regex, factor), scales the step of the matching trainable params (e.g. the tanh gates on a short run).
Contrastive (App. B.1.3): Adam (`kind='adam'`: weight decay as L2 in the gradient) with the rate
decayed linearly to 0, adaptive gradient clipping (AGC, Brock et al. 2021) on the NFNet's parameters and
a global-norm clip scoped to the text encoder's (`grad_clip_on`).
"""

import re

import optax


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warm-up from 0 to `cfg.lr`, then `cfg.decay`: constant, or cosine / linear to 0 at
  `cfg.total_steps`."""
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  span = max(cfg.total_steps - cfg.warmup_steps, 1)
  if cfg.decay == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.decay == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, span)
  elif cfg.decay == "linear":
    after = optax.linear_schedule(cfg.lr, 0.0, span)
  else:
    raise ValueError(f"optim.decay must be 'constant', 'cosine' or 'linear', got {cfg.decay!r}")
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _path_mask(params, patterns, value_if_match: bool):
  """A params-shaped tree of bools: `value_if_match` where the path matches any pattern."""
  return {
    module: {
      name: (any(re.search(p, f"{module}/{name}") for p in patterns) == value_if_match) for name in leaves
    }
    for module, leaves in params.items()
  }


def clipping(cfg, trainable_params) -> list[optax.GradientTransformation]:
  """The gradient clips of `cfg`, in order: AGC on `agc_on`, then the global-norm clip of the
  params of `grad_clip_on` (their own norm: optax.masked passes it only those leaves). A list, so
  that `make_optimizer` chains them flat: the optimiser state keeps the layout saved checkpoints have."""
  parts = []
  if cfg.agc_clip > 0:
    agc = optax.adaptive_grad_clip(cfg.agc_clip)
    agc_mask = _path_mask(trainable_params, list(cfg.agc_on), value_if_match=True)
    parts.append(optax.masked(agc, agc_mask))
  if cfg.grad_clip_norm > 0:
    clip = optax.clip_by_global_norm(cfg.grad_clip_norm)
    if list(cfg.grad_clip_on) != [".*"]:  # unscoped: no mask, the state layout of saved checkpoints
      clip = optax.masked(clip, _path_mask(trainable_params, list(cfg.grad_clip_on), value_if_match=True))
    parts.append(clip)
  return parts


def make_optimizer(cfg, trainable_params) -> optax.GradientTransformation:
  """The optimiser for `trainable_params` from a config's `optim` section."""
  schedule = learning_rate_schedule(cfg)
  decay_mask = _path_mask(trainable_params, list(cfg.no_decay), value_if_match=False)
  parts = clipping(cfg, trainable_params)
  if cfg.kind == "adamw":
    parts.append(
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
  elif cfg.kind == "adam":  # weight decay as an L2 term in the gradient, before Adam's scaling
    parts += [
      optax.masked(optax.add_decayed_weights(cfg.weight_decay), decay_mask),
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.scale_by_learning_rate(schedule),
    ]
  else:
    raise ValueError(f"optim.kind must be 'adamw' or 'adam', got {cfg.kind!r}")
  for pattern, factor in cfg.lr_multipliers:
    mask = _path_mask(trainable_params, [pattern], value_if_match=True)
    if not any(any(leaves.values()) for leaves in mask.values()):
      raise ValueError(f"optim.lr_multipliers: {pattern!r} matches no trainable parameter")
    parts.append(optax.masked(optax.scale(float(factor)), mask))
  return optax.chain(*parts)
