"""The paper's phi: which media item each text token cross-attends to.

Shapes: B batch, T tokens. A token attends to the visual tokens of the last `<image>` marker at or before
it (the marker itself included), or with `attend_next` to the first marker after it (p_next augmentation,
§3 of the paper's appendix). -1 means "no media": the cross-attention output is then exactly zero.
"""

import jax
import jax.numpy as jnp
import numpy as np


def media_index_from_tokens(tokens, image_id: int, attend_next=False, reset_id: int | None = None):
  """phi for a batch of token ids; the one implementation, for the model (jax) and the data (numpy).

  Args:
    tokens: int [B, T], a jax array (traced or not) or a numpy array (the input pipelines).
    image_id: id of the `<image>` marker.
    attend_next: bool or bool [B]; per sequence, attend to the next image instead of the previous one.
    reset_id: IDEFICS's rule (`xattn.media_reset='eos'`): the tokens after this one (its end of
      sequence) see no image until the next marker; the token itself keeps its image. Previous-image
      mode only.

  Returns:
    int32 [B, T] of the same array kind: the media index per token, -1 where there is none.
  """
  xp = jnp if isinstance(tokens, jax.Array) else np
  is_image = (tokens == image_id).astype(xp.int32)
  seen = xp.cumsum(is_image, axis=1)  # markers at or before t
  previous = seen - 1  # -1 before the first marker
  count = seen[:, -1:]
  # Next marker strictly after t, or the marker at t itself: index = markers before t.
  before = seen - is_image
  following = xp.where(before < count, before, -1)
  if reset_id is not None:
    cummax = (
      (lambda a: jax.lax.cummax(a, axis=1)) if xp is jnp else (lambda a: np.maximum.accumulate(a, axis=1))
    )
    position = xp.broadcast_to(xp.arange(tokens.shape[1]), tokens.shape)
    last_image = cummax(xp.where(tokens == image_id, position, -1))  # at or before t
    last_reset = cummax(xp.where(tokens == reset_id, position, -1))
    reset_before = xp.concatenate(
      [xp.full_like(last_reset[:, :1], -1), last_reset[:, :-1]], axis=1
    )  # before t
    previous = xp.where(reset_before > last_image, -1, previous)
  attend_next = xp.broadcast_to(xp.asarray(attend_next), tokens.shape[:1])[:, None]
  return xp.where(attend_next, following, previous).astype(xp.int32)
