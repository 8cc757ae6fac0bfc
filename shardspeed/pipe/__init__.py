"""Pipeline parallelism, the module side: ``PipelineModule`` cuts a list of layers into stages and
builds only this rank's; ``LayerSpec``/``TiedLayerSpec`` defer building; ``schedule`` turns
(micro-batches, stages, stage) into the instructions the pipeline engine executes.

DeepSpeed scripts reach these as ``deepspeed.pipe.PipelineModule`` etc. after
``import shardspeed as deepspeed``.
"""

from shardspeed.comm import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology
from shardspeed.pipe import schedule
from shardspeed.pipe.module import PipelineModule, TiedWeightGroup
from shardspeed.pipe.spec import LayerSpec, TiedLayerSpec

__all__ = ["LayerSpec", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipelineModule",
           "ProcessTopology", "TiedLayerSpec", "TiedWeightGroup", "schedule"]
