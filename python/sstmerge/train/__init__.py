"""LoRA training with peft (the adapters of every model) and the tiny model's pretraining.

``train_lora`` trains a standard peft LoRA adapter on chat rows (safety) or MMLU rows (utility) and
saves it atomically; ``pretrain_causal_lm`` trains all parameters of a (tiny) model on raw/chat text.
"""

from .lora import DEFAULT_TARGET_MODULES, train_lora
from .loop import finetune_full, pretrain_causal_lm

__all__ = ["DEFAULT_TARGET_MODULES", "train_lora", "pretrain_causal_lm", "finetune_full"]
