"""The DAG's stages, in order. Each has a ``name``, the stages it ``needs``, a ``key`` (what
its output path hashes) and ``run`` (which writes everything, then the marker)."""

from pipelines.stages.audio import AudioStage
from pipelines.stages.evaluate import EvaluateStage
from pipelines.stages.ingest import IngestStage
from pipelines.stages.release import GenerateStage, PackageStage, PromoteStage
from pipelines.stages.text import TextStage
from pipelines.stages.train import LatentsStage, TrainLFMStage, TrainVAEStage, TrainVocoderStage

STAGES = [IngestStage(), AudioStage(), TextStage(), TrainVAEStage(), TrainVocoderStage(), LatentsStage(),
          TrainLFMStage(), PackageStage(), EvaluateStage(), PromoteStage(), GenerateStage()]

__all__ = ["STAGES", "AudioStage", "EvaluateStage", "GenerateStage", "IngestStage", "LatentsStage", "PackageStage", "PromoteStage",
           "TextStage", "TrainLFMStage", "TrainVAEStage", "TrainVocoderStage"]
