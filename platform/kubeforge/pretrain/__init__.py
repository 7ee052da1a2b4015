"""Pretraining stage: a Llama (causal) or BERT (mlm) model trained from scratch with Ray Train.

Kept free of heavy imports: `kubeforge.pretrain.stage.run` pulls in torch, ray and transformers only
when the stage actually runs, so the CLI stays fast.
"""
