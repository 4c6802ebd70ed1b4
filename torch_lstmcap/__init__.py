"""torch_lstmcap: LSTM image captioning with a hand-written, gradchecked LSTM.

The modules that training needs (datasets, metrics, training) are imported on use, so that
captioning a photograph does not pay for them.
"""

from .captioner import Captioner, CaptionerConfig
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .decoding import beam_search, greedy_decode
from .encoder import ImageLoadError, build_encoder, load_image
from .inference import ImageCaptioner, default_checkpoint_path
from .lstm import LSTM, LSTMSequenceFunction, LSTMStepFunction, lstm_forward, lstm_step
from .vocab import Vocabulary, tokenize

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "Captioner",
    "CaptionerConfig",
    "CheckpointError",
    "ImageCaptioner",
    "ImageLoadError",
    "LSTMSequenceFunction",
    "LSTMStepFunction",
    "Vocabulary",
    "beam_search",
    "build_encoder",
    "default_checkpoint_path",
    "greedy_decode",
    "load_checkpoint",
    "load_image",
    "lstm_forward",
    "lstm_step",
    "save_checkpoint",
    "tokenize",
]
