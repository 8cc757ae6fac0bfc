"""Loss scaling and the dtype policy (what lives in fp32, bf16 or fp16)."""

from shardspeed.precision.loss_scaler import LossScaler, LossScalerState
from shardspeed.precision.policy import DTYPES, PrecisionPolicy

__all__ = ["DTYPES", "LossScaler", "LossScalerState", "PrecisionPolicy"]
