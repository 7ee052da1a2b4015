"""Formats that the fine-tuning, evaluate and serving code must agree on: the chat template and the task's
on-disk splits.

Shared by several stage packages, which must not import each other, so it depends on nothing but
`kubeforge.errors` and stays light to import (no torch, numpy or tokenizers at module level).
"""
