"""The `tune` stage: hyper-parameter search with Ray Tune, Optuna (TPE) and ASHA over a training loop."""
