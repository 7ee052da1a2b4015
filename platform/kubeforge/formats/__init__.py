"""Formats that the fine-tuning, evaluate and serving code must agree on: the chat template (`chat`) and
the task's splits on disk (`splits`).

Shared by several stage packages, which must not import each other, so it depends on nothing but
`kubeforge.errors` and stays light to import.
"""
