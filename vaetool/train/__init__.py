"""`vaetool train`: train or fine-tune an autoencoder from a YAML config (the shipped `mini` model was made so)."""

from vaetool.train.loop import TrainResult, train
from vaetool.train.settings import TrainSettings, load_train_settings

__all__ = ["TrainResult", "TrainSettings", "load_train_settings", "train"]
