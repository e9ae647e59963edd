"""Audio I/O, resampling and the shared log-mel."""

from lafma.audio.io import AudioError, fit_length, load_audio, read_audio, resample, write_audio
from lafma.audio.mel import MelSpectrogram

__all__ = ["AudioError", "MelSpectrogram", "fit_length", "load_audio", "read_audio", "resample", "write_audio"]
