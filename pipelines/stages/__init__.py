"""The DAG's stages, in order. Each has a ``name``, the stages it ``needs``, a ``key`` (what
its output path hashes) and ``run`` (which writes everything, then the marker)."""

from pipelines.stages.audio import AudioStage
from pipelines.stages.ingest import IngestStage
from pipelines.stages.text import TextStage

STAGES = [IngestStage(), AudioStage(), TextStage()]

__all__ = ["STAGES", "AudioStage", "IngestStage", "TextStage"]
