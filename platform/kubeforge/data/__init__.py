"""The data stage: read, clean, deduplicate, filter, redact, tokenise and pack a corpus.

`kubeforge.data.stage.run` runs it; importing this package loads neither Ray nor pandas nor `tokenizers`.
"""
