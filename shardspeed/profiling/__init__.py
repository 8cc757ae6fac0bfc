"""Measuring a model: FLOPs/MACs per module, throughput and MFU."""

from shardspeed.profiling import flops_profiler
from shardspeed.profiling.flops_profiler import FlopsProfiler, get_model_profile, param_count, param_counts
from shardspeed.profiling.throughput import Throughput, measure_peak_tflops

__all__ = ["FlopsProfiler", "Throughput", "flops_profiler", "get_model_profile", "measure_peak_tflops", "param_count",
           "param_counts"]
