"""The DAG's table: its stages, in order. Each is a :class:`~pipelines.core.stage.Stage`: a
``name``, the stages it ``needs``, a ``key`` (what its output path hashes), ``run`` (which writes
everything, then the marker) and, where it has something to say, ``done``, ``version``,
``check`` and ``summary``. Adding a stage is a class in this package and a line here."""

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
