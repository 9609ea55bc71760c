"""The paper's phi: which media item each text token cross-attends to.

Shapes: B batch, T tokens. A token attends to the visual tokens of the last `<image>` marker at or before
it (the marker itself included), or with `attend_next` to the first marker after it (p_next augmentation,
§3 of the paper's appendix). -1 means "no media": the cross-attention output is then exactly zero.
"""

import jax
import jax.numpy as jnp


def media_index_from_tokens(tokens: jax.Array, image_id: int, attend_next=False) -> jax.Array:
  """phi for a batch of token ids.

  Args:
    tokens: int [B, T].
    image_id: id of the `<image>` marker.
    attend_next: bool or bool [B]; per sequence, attend to the next image instead of the previous one.

  Returns:
    int32 [B, T]: the media index per token, -1 where there is none.
  """
  is_image = (tokens == image_id).astype(jnp.int32)
  seen = jnp.cumsum(is_image, axis=1)  # markers at or before t
  previous = seen - 1  # -1 before the first marker
  count = seen[:, -1:]
  # Next marker strictly after t, or the marker at t itself: index = markers before t.
  before = seen - is_image
  following = jnp.where(before < count, before, -1)
  attend_next = jnp.broadcast_to(jnp.asarray(attend_next), tokens.shape[:1])[:, None]
  return jnp.where(attend_next, following, previous).astype(jnp.int32)
