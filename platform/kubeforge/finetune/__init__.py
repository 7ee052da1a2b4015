"""Fine-tuning stage: SFT, DPO or distillation of a trained model on a task, with full or PEFT training."""
