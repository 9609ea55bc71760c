"""Data: TFDS builders over local files, tf.data pipelines per dataset, the training mixture.

Modules: `builders/` (TFDS builders), `preprocess.py` (images), `sequence.py` (token sequences ->
tokens/targets/masks/phi), `pairs.py`, `interleaved.py`, `video.py` (per-example processing),
`pipeline.py` (one dataset's tf.data pipeline), `mixture.py` (all datasets per step, iterator state),
`global_batch.py` (host batches -> global jax.Arrays), `tokenizer.py` (the LM tokenizer).
"""
