"""Data: the built-in demo corpus (manifest readers live beside it)."""

from lafma.data.demo import (
    ATTRIBUTE_COLUMNS,
    COLUMNS,
    DemoClip,
    demo_clips,
    split_of,
    write_demo_corpus,
)
from lafma.data.demo_instruments import INSTRUMENTS, PATTERNS, REGISTERS, render_instrument
from lafma.data.demo_synth import SYNTH_KINDS

__all__ = [
    "ATTRIBUTE_COLUMNS",
    "COLUMNS",
    "INSTRUMENTS",
    "PATTERNS",
    "REGISTERS",
    "SYNTH_KINDS",
    "DemoClip",
    "demo_clips",
    "render_instrument",
    "split_of",
    "write_demo_corpus",
]
