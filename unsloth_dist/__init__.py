"""unsloth_dist: fine-tune Hugging Face causal LMs on one GPU or many."""
from .config import ConfigError, TrainConfig, load_config
from .models.loader import FastLanguageModel
from .trainer import Trainer, TrainResult

__all__ = ["ConfigError", "FastLanguageModel", "TrainConfig", "Trainer", "TrainResult", "load_config"]
__version__ = "0.1.0"
