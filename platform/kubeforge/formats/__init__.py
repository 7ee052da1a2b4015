"""Formats that the fine-tuning, evaluate and serving code must agree on: the chat template (`chat`), the
task's splits on disk (`splits`) and the fine-tuning stage's model output (`finetuned_model`).

Shared by several stage packages, which must not import each other, so it depends on nothing but
`kubeforge.errors` and stays light to import (torch, transformers and peft only inside the functions
that load a model).
"""
