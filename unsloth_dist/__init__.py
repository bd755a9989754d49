"""unsloth_dist: fine-tune Hugging Face causal LMs on one GPU or many."""
from .config import ConfigError, TrainConfig, load_config
from .models.loader import FastLanguageModel
from .seed_api import UnslothTrainer, UnslothTrainingArguments
from .trainer import Trainer, TrainResult


def is_bfloat16_supported() -> bool:
    """unsloth's helper for notebooks: whether this machine's GPU computes in bf16 (False without one)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


__all__ = ["ConfigError", "FastLanguageModel", "TrainConfig", "Trainer", "TrainResult", "UnslothTrainer",
           "UnslothTrainingArguments", "is_bfloat16_supported", "load_config"]
__version__ = "0.1.0"
