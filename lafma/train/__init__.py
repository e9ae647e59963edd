"""Pure-PyTorch training pieces (EMA, schedules, objectives, the weighted loss sum). The
distributed loops that use them live in ``pipelines/``; nothing here knows about Ray,
DeepSpeed or MLflow."""

from lafma.train.ema import EMA
from lafma.train.losses import weighted_sum
from lafma.train.objectives import lfm_loss
from lafma.train.schedule import warmup_decay

__all__ = ["EMA", "lfm_loss", "warmup_decay", "weighted_sum"]
