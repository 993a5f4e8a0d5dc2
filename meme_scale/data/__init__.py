"""Data layer (DESIGN 2): shard format, writer, reader, observation masks and converters.

Layering: this package knows shards, masks and tokenizers only; it never imports models, the
engine (DeepSpeed), tracking (MLflow) or meme_scale.config, so the trainer wires it up with plain
arguments. Import the submodules directly (``meme_scale.data.shards``, ``.writer``, ``.masks``);
nothing is re-exported here so that ``import meme_scale.data`` stays cheap.
"""
