import math

import numpy as np
import pytest
import soundfile as sf
import torch

from lafma.audio import AudioError, MelSpectrogram, fit_length, load_audio, read_audio, resample
from lafma.audio.io import MAX_RESAMPLE_KERNEL, resample_kernel_size
from lafma.config import MelConfig

SR = 16000


def slaney_hz_to_mel(f: float) -> float:
    # Slaney's Auditory Toolbox scale: linear below 1 kHz, logarithmic above.
    return f / (200 / 3) if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)


def slaney_mel_to_hz(m: float) -> float:
    return m * (200 / 3) if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)


def tone(freq: float, seconds: float = 1.0, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


@pytest.mark.parametrize("k", [5, 20, 40, 60])
def test_pure_tone_peaks_in_its_mel_bin(k):
    cfg = MelConfig()
    lo, hi = slaney_hz_to_mel(cfg.f_min), slaney_hz_to_mel(cfg.f_max)
    centre = slaney_mel_to_hz(lo + (hi - lo) * (k + 1) / (cfg.n_mels + 1))  # bin k's centre
    mel = MelSpectrogram.from_config(cfg)(torch.from_numpy(tone(centre)))
    assert mel.shape == (64, 100)
    peaks = mel[:, 10:-10].argmax(dim=0)
    assert (peaks == k).all(), f"{centre:.0f} Hz peaked in {peaks.unique().tolist()}, not {k}"


def test_mel_frames_and_log_floor():
    mel_fn = MelSpectrogram.from_config(MelConfig())
    assert mel_fn(torch.zeros(163840)).shape == (64, 1024)  # 10.24 s -> 1024 frames
    assert torch.allclose(mel_fn(torch.zeros(2, 1600)), torch.tensor(math.log(1e-5)))
    assert mel_fn(torch.zeros(3, 3200)).shape == (3, 64, 20)


@pytest.mark.parametrize("subtype, sr, channels, fmt", [
    ("PCM_U8", 8000, 1, "WAV"),
    ("PCM_16", 16000, 2, "WAV"),
    ("PCM_24", 22050, 6, "WAV"),
    ("FLOAT", 44100, 1, "WAV"),
    ("PCM_16", 48000, 2, "FLAC"),
    ("VORBIS", 44100, 2, "OGG"),
])
def test_reads_common_formats_to_mono_at_16k(tmp_path, subtype, sr, channels, fmt):
    x = tone(440, 1.0, sr)
    data = np.stack([x] * channels, axis=1)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, data, sr, subtype=subtype, format=fmt)
    raw, got_sr = read_audio(path)
    assert got_sr == sr and raw.ndim == 1 and raw.dtype == np.float32
    wav = load_audio(path, SR)
    assert abs(len(wav) - SR) <= 1
    assert abs(dominant_hz(wav.numpy(), SR) - 440) < 3
    assert 0.3 < float(wav.abs().max()) < 0.7  # amplitude survives decoding and downmix


def test_downmix_averages_channels(tmp_path):
    left, right = tone(440), np.zeros(SR, np.float32)
    path = tmp_path / "st.wav"
    sf.write(path, np.stack([left, right], 1), SR, subtype="FLOAT")
    wav, _ = read_audio(path)
    np.testing.assert_allclose(wav, left / 2, atol=1e-6)


def test_reads_bytes():
    import io

    buf = io.BytesIO()
    sf.write(buf, tone(300), SR, format="WAV")
    wav, sr = read_audio(buf.getvalue(), name="s3://bucket/a.wav")
    assert sr == SR and len(wav) == SR


def _bad_inputs(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, tone(440), SR)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:30])
    random = tmp_path / "random.wav"
    random.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    nan = tmp_path / "nan.wav"
    x = tone(440)
    x[100] = np.nan
    sf.write(nan, x, SR, subtype="FLOAT")
    inf = tmp_path / "inf.wav"
    x = tone(440)
    x[5] = np.inf
    sf.write(inf, x, SR, subtype="FLOAT")
    zero_frames = tmp_path / "zero_frames.wav"
    sf.write(zero_frames, np.zeros(0, np.float32), SR)
    return {
        "missing": (tmp_path / "nope.wav", "missing"),
        "empty": (empty, "empty"),
        "truncated": (truncated, "undecodable"),
        "random": (random, "undecodable"),
        "text": (text, "undecodable"),
        "directory": (tmp_path, "undecodable"),
        "nan": (nan, "non_finite"),
        "inf": (inf, "non_finite"),
        "zero_frames": (zero_frames, "no_samples"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "random", "text", "directory", "nan",
                                  "inf", "zero_frames"])
def test_unusable_input_raises_the_typed_error_naming_file_and_reason(tmp_path, case):
    path, reason = _bad_inputs(tmp_path)[case]
    with pytest.raises(AudioError) as e:
        load_audio(path, SR)
    assert e.value.reason == reason
    assert str(path) in str(e.value)


def _wav_bytes(seconds: float, sr: int, channels: int = 1) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, np.stack([tone(440, seconds, sr)] * channels, axis=1), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize("raw, caps, reason", [
    (_wav_bytes(0.05, SR, channels=8), {"max_channels": 2}, "too_many_channels"),
    (_wav_bytes(0.01, 384000), {"max_sample_rate": 192000}, "rate_too_high"),
    (_wav_bytes(2.0, SR), {"max_seconds": 1.0}, "too_long"),
])
def test_header_caps_refuse_before_decoding(raw, caps, reason, monkeypatch):
    monkeypatch.setattr(sf, "read", lambda *a, **k: pytest.fail("decoded a file its header refuses"))
    with pytest.raises(AudioError) as e:
        read_audio(raw, name="s3://b/x.wav", **caps)
    assert e.value.reason == reason and "s3://b/x.wav" in str(e.value)


def test_within_the_header_caps_reads_as_before():
    raw = _wav_bytes(0.5, 48000, channels=2)
    np.testing.assert_array_equal(read_audio(raw, max_channels=2, max_sample_rate=48000, max_seconds=1)[0],
                                  read_audio(raw)[0])


@pytest.mark.parametrize("sr", [16000, 22050, 44100, 48000])
def test_decode_seconds_decodes_the_start_and_resamples_it_as_the_whole_file(sr):
    import io

    x = (0.1 * np.random.default_rng(0).standard_normal((12 * sr, 2))).astype(np.float32)
    sf.write(buf := io.BytesIO(), x, sr, format="FLAC")
    whole = load_audio(buf.getvalue(), SR)
    start = load_audio(buf.getvalue(), SR, decode_seconds=3.0)
    assert 3 * SR < len(start) < 5 * SR < len(whole)  # 3 s and the margin, not 12 s
    assert torch.equal(start[: 3 * SR], whole[: 3 * SR])


def test_resample_kernel_size_is_torchaudios():
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    for sr in (8000, 22050, 44100, 48000, 7350, 44056):
        kernel, _ = _get_sinc_resample_kernel(sr, SR, math.gcd(sr, SR))
        assert resample_kernel_size(sr, SR) == kernel.numel()


def test_a_rate_whose_resampling_filter_would_fill_memory_is_refused():
    # 44101 Hz shares no factor with 16 kHz: a 706 M-value filter (5.6 GB while built).
    assert resample_kernel_size(44101, SR) > MAX_RESAMPLE_KERNEL > resample_kernel_size(44056, SR)
    with pytest.raises(AudioError) as e:
        load_audio(_wav_bytes(0.05, 44101), SR, name="odd.wav")
    assert e.value.reason == "bad_rate" and "44101 Hz" in str(e.value)


def test_resample_keeps_pitch_and_duration():
    y = resample(tone(1000, 1.0, 44100), 44100, SR)
    assert abs(len(y) - SR) <= 1
    assert abs(dominant_hz(y.numpy(), SR) - 1000) < 3


def test_fit_length():
    x = torch.arange(10.0)
    assert torch.equal(fit_length(x, 4), x[:4])
    assert torch.equal(fit_length(x, 12)[10:], torch.zeros(2))


def test_too_long_is_read_from_the_header_before_decoding(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(SR * 5, np.float32), SR)
    with pytest.raises(AudioError) as e:
        read_audio(path, max_seconds=2.0)
    assert e.value.reason == "too_long"
    assert len(read_audio(path.read_bytes(), max_seconds=10.0)[0]) == SR * 5  # bytes rewound after the check
