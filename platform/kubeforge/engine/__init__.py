"""The training engine every stage that trains shares.

* `recipe`: the named lifecycle of one worker's run (`setup` → model / optimizer / data → `train` →
  `save_checkpoint`) and the typed loop configuration every recipe's config extends;
* `session`: where the loop runs (a Ray Train worker, a Ray Tune trial, or this process);
* `batches`: token shards, the position-addressed sampler, masking and batching of token rows;
* `state`: checkpoints, RNG state and resuming;
* `steps`: the optimizer step, evaluation, all-reduce, precision;
* `optim`: AdamW and the learning-rate schedule;
* `fsdp`: sharding a model (FSDP2) one transformer layer at a time, and where that is refused;
* `model`: the tiny Llama and BERT models built from a `model` section;
* `fit`: running a recipe on Ray Train workers with progress (`hub`) to the driver;

Stage packages import from here; nothing here imports a stage package.
"""
