"""Example models and data for pipetrain.

``models.gpt`` (flagship character-level GPT) with ``models.text`` (its
corpus, shipped with Python), and ``models.mlp`` (a small classifier with a
synthetic teacher data set). Configs name them by import path, e.g.
``models.gpt:build``. Importing this package imports no framework.
"""
