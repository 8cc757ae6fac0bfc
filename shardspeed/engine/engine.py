"""The engine: forward, backward, step with gradient accumulation, on top of one ZeRO strategy.

The engine is an ``nn.Module`` wrapping the user's module (``engine.module``), as DeepSpeed's is,
so ``engine(batch)``, ``engine.train()``, ``engine.parameters()`` behave as users expect.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from shardspeed.accelerator import get_accelerator
from shardspeed.checkpoint import full_module_state, load_checkpoint, save_checkpoint
from shardspeed.comm import Topology, broadcast, enable_comm_log, get_global_rank, get_rank
from shardspeed.config import ConfigError, ShardspeedConfig, resolve_batch_sizes
from shardspeed.data import ResumableLoader, build_dataloader
from shardspeed.engine.components import check_optimizer_in_backward, make_optimizer, make_scheduler, param_groups
from shardspeed.engine.reporting import StepReporter
from shardspeed.engine.timers import Timers
from shardspeed.precision import LossScaler, PrecisionPolicy
from shardspeed.zero import Stage3Options, StrategyOptions, make_strategy
from shardspeed.zero.stage3_parts import ParamOffload
from shardspeed.zero.swap_optimizer import make_optimizer_swapper

log = logging.getLogger("shardspeed")

_DDP_BUCKET_BYTES = 25 * 2**20  # stage 0's default bucket, as DDP's bucket_cap_mb


class ShardspeedEngine(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, config: ShardspeedConfig, topo: Topology, local_rank: int = 0,
                 optimizer: Any = None, model_parameters: Any = None, lr_scheduler: Any = None,
                 training_data: Any = None, collate_fn: Any = None):
        super().__init__()
        self.config = config
        self.topo = topo
        self.batch = resolve_batch_sizes(config.train_batch_size, config.train_micro_batch_size_per_gpu,
                                         config.gradient_accumulation_steps, topo.dp_world_size)
        self.accelerator = get_accelerator()
        self.policy = PrecisionPolicy.from_config(config, self.accelerator.name)
        self.device = self.accelerator.device(local_rank)
        self.module = model.to(device=self.device)
        self._broadcast_module()
        self.reporter = StepReporter(self)  # counts parameters before stage 3 partitions them
        # what was trainable when the gradient buffers and partitions were planned (Note: frozen at initialize)
        self._planned = [(n, p, p.requires_grad) for n, p in self.module.named_parameters()]
        groups = param_groups(self.module, model_parameters, optimizer)
        z = config.zero_optimization
        prefetch = z.stage3_prefetch_bucket_size if "stage3_prefetch_bucket_size" in z.model_fields_set else None
        z3 = Stage3Options(prefetch_numel=prefetch,  # None: stage 3 sizes it to the model (Note: default windows)
                           persistence_threshold=z.stage3_param_persistence_threshold,
                           max_live_numel=z.stage3_max_live_parameters,
                           coalesce_layers=z.stage3_coalesce_layers,
                           max_reuse_distance=z.stage3_max_reuse_distance,
                           optimizer_in_backward=z.optimizer_in_backward,
                           param_offload=self._param_offload())
        self.strategy = make_strategy(z.stage, self.module, topo, self._strategy_options(),
                                      [g["params"] for g in groups], z3)
        if self.policy.compute != torch.float32:
            # After the strategy took its fp32 masters from the full-precision weights: masters made
            # from already-rounded bf16 weights would start training from a perturbed model.
            # ``Module.to`` keeps each Parameter object (it swaps ``.data``), so hooks stay attached.
            self.module.to(dtype=self.policy.compute)
        self.optimizer, opt_clip = make_optimizer(config, optimizer, groups, self.strategy)
        if self.optimizer is not None:
            self.strategy.attach_optimizer(self.optimizer)
        self.clip_norm = config.gradient_clipping or opt_clip
        check_optimizer_in_backward(config, self.optimizer, self.clip_norm, self.batch.gradient_accumulation_steps)
        # offload_optimizer: the optimizer's per-element state lives on disk and steps in sub-groups
        self.optimizer_swapper = make_optimizer_swapper(config, self.optimizer, self.strategy, get_rank(),
                                                         self.device)
        self.lr_scheduler = make_scheduler(config, lr_scheduler, self.optimizer)
        self.loss_scaler = LossScaler.from_config(config.fp16) if config.fp16.enabled else None
        self.training_dataloader = None
        if training_data is not None:
            self.training_dataloader = ResumableLoader(build_dataloader(
                training_data, self.batch.train_micro_batch_size_per_gpu, topo.dp_rank, topo.dp_world_size,
                collate_fn=collate_fn, drop_last=config.dataloader_drop_last))
        self.global_steps = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.global_samples = 0
        self.timers = Timers(config.wall_clock_breakdown, self.accelerator.synchronize)
        self.comm_stats = enable_comm_log(config.comms_logger.verbose) if config.comms_logger.enabled else None
        self._in_no_sync = False
        self._last_grad_norm: float | None = None
        if config.memory_breakdown and get_rank() == 0:
            log.info("memory breakdown (bytes): %s", self.memory_breakdown())

    def _param_offload(self) -> ParamOffload | None:
        """offload_param with device nvme: stage 3's shards on disk (zero/swap_params.py); device cpu
        on a CPU run is where they already are (logged once)."""
        off = self.config.zero_optimization.offload_param
        if off is None or off.device == "none":
            return None
        if self.device.type != "cpu":
            raise ConfigError(f"zero_optimization.offload_param.device '{off.device}' is not supported yet with a "
                              f"{self.device.type} training device: offload is implemented for CPU training; set "
                              "\"device\": \"none\"")
        if off.device == "cpu":
            if get_rank() == 0:
                log.info("zero_optimization.offload_param.device 'cpu': training runs on the CPU, so the parameter "
                         "shards are already in host memory; nothing moves")
            return None
        return ParamOffload(nvme_path=off.nvme_path or "", buffer_count=off.buffer_count, buffer_size=off.buffer_size,
                            aio=self.config.aio, rank=get_rank())

    def _strategy_options(self) -> StrategyOptions:
        z = self.config.zero_optimization
        if "reduce_bucket_size" in z.model_fields_set:
            bucket = z.reduce_bucket_size
        else:
            bucket = _DDP_BUCKET_BYTES // torch.tensor([], dtype=self.policy.grad_accum).element_size()
        return StrategyOptions(
            compute_dtype=self.policy.compute, grad_accum_dtype=self.policy.grad_accum,
            reduce_dtype=self.policy.reduce, bucket_numel=bucket, prescale=self.config.prescale_gradients,
            predivide_factor=self.config.gradient_predivide_factor,
            overlap=z.overlap_comm if z.overlap_comm is not None else True,
            overlap_param_gather=z.overlap_comm is True, reduce_scatter=z.reduce_scatter,
            allgather_partitions=z.allgather_partitions, sparse_gradients=self.config.sparse_gradients,
            # unset, the parameter all-gathers after step() are bounded like the reductions: every
            # gather in flight holds its bucket twice on gloo (a flat copy), so 5e8 would put a
            # second copy of the whole model in memory at the end of each step
            allgather_numel=z.allgather_bucket_size if "allgather_bucket_size" in z.model_fields_set else bucket)

    def _broadcast_module(self) -> None:
        """Start every data-parallel replica from rank 0's parameters and buffers."""
        if self.topo.dp_world_size == 1:
            return
        src = get_global_rank(self.topo.dp_group, 0)
        with torch.no_grad():
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                broadcast(t.data, src=src, group=self.topo.dp_group)

    # -- sizes and state --------------------------------------------------------------------------
    def train_batch_size(self) -> int:
        return self.batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.batch.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self.batch.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.batch.gradient_accumulation_steps == 0

    @property
    def monitor(self) -> Any:
        """The enabled monitors (DeepSpeed's ``engine.monitor``): ``write_events([(name, value, x)])`` adds
        a script's own metrics (an evaluation score) next to the engine's; only rank 0 writes."""
        return self.reporter.monitor

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups] if self.optimizer else []

    def get_global_grad_norm(self) -> float | None:
        """The global gradient norm of the last step (None unless clipping or fp16 needed it)."""
        return self._last_grad_norm

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler else 1.0

    @property
    def dp_world_size(self) -> int:
        return self.topo.dp_world_size

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients, optimizer state and module buffers. Under
        tensor slicing a sliced parameter counts as the 1/T slice this rank holds, and so do its
        gradient and optimizer state."""
        out = dict(self.strategy.state_bytes())
        seen: set[int] = set()
        opt_bytes = 0
        if self.optimizer is not None:
            for st in self.optimizer.state.values():
                for v in st.values():
                    if torch.is_tensor(v) and v.data_ptr() not in seen:
                        seen.add(v.data_ptr())
                        opt_bytes += v.numel() * v.element_size()
        out["optimizer_states"] = opt_bytes  # in memory: an offloaded sub-group's state counts below
        if self.optimizer_swapper is not None:
            out["offload_buffers"] = self.optimizer_swapper.buffer_bytes()
            out["optimizer_states_on_disk"] = self.optimizer_swapper.disk_bytes()
        out["buffers"] = sum(b.numel() * b.element_size() for b in self.module.buffers())
        return out

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict[str, Any] | None = None,
                        save_latest: bool = True) -> bool:
        """Save everything needed to resume exactly, at any world size or ZeRO stage, under
        ``save_dir/tag`` (default tag ``global_step{N}``). Every rank must call it."""
        return save_checkpoint(self, save_dir, tag=tag, client_state=client_state, save_latest=save_latest)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False) -> tuple[str, dict[str, Any]]:
        """Load ``load_dir/tag`` (default: the tag in ``load_dir/latest``); returns (path, client_state)."""
        return load_checkpoint(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                               load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin") -> bool:
        """Write the whole model's state dict in its compute dtype, tensor-parallel slices joined and, for
        a pipeline, every stage's layers under the plain ``nn.Sequential``'s names (rank 0 writes; every
        rank must call it: gathering ZeRO stage 3 partitions, slices and stages are collectives)."""
        state = {k: v.detach().to(self.policy.compute) if v.is_floating_point() else v.detach()
                 for k, v in full_module_state(self).items()}
        if get_rank() == 0:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, save_filename)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)  # never a half-written file under the real name
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.reporter.before_forward()
        with self.timers("forward"):
            args, kwargs = self._to_device((args, kwargs))
            with self.strategy.forward_context():
                out = self.module(*args, **kwargs)
        self.reporter.after_forward()
        return out

    def _to_device(self, obj: Any) -> Any:
        """Move tensors to this rank's device; floating inputs take the compute dtype."""
        if torch.is_tensor(obj):
            dtype = self.policy.compute if obj.is_floating_point() else None
            # from pinned host memory the copy is asynchronous (ordered on the stream that uses it)
            return obj.to(device=self.device, dtype=dtype, non_blocking=obj.is_pinned())
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._to_device(x) for x in obj)
        if isinstance(obj, dict):
            return {k: self._to_device(v) for k, v in obj.items()}
        return obj

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backpropagate ``loss`` scaled by 1/gradient_accumulation_steps (and the fp16 loss scale).
        Gradients are reduced across data-parallel ranks only on the boundary micro-batch."""
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ValueError(f"engine.backward expects a scalar loss tensor, got {type(loss).__name__}"
                             f"{' of shape ' + str(tuple(loss.shape)) if torch.is_tensor(loss) else ''}")
        with self.timers("backward"):
            boundary = self.is_gradient_accumulation_boundary()
            if boundary and self.optimizer_swapper is not None and not self.strategy.steps_in_backward:
                self.optimizer_swapper.prefetch()  # the step's first reads overlap this backward
            self.strategy.begin_backward(boundary)
            scale = self.loss_scale / (self.batch.gradient_accumulation_steps if scale_wrt_gas else 1)
            (loss.float() * scale).backward(retain_graph=retain_graph)
            self.strategy.finish_backward()
        self.reporter.on_backward(loss)
        return loss

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside skips the gradient reduction (it happens on the next backward outside)."""
        prev, self._in_no_sync = self._in_no_sync, True
        try:
            with self.strategy.no_sync():
                yield
        finally:
            self._in_no_sync = prev

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.strategy.zero_grad()

    def step(self) -> None:
        """At an accumulation boundary: update the parameters; otherwise only count the micro-batch."""
        if self.is_gradient_accumulation_boundary():
            if self._in_no_sync:
                raise RuntimeError("engine.step() at a gradient accumulation boundary inside no_sync(): "
                                   "gradients were never reduced; leave no_sync() before the boundary step")
            if self.optimizer is None:
                raise RuntimeError("engine.step() needs an optimizer: pass initialize(optimizer=...) or add an "
                                   "'optimizer' section to the config")
            self._check_frozen()
            with self.timers("step"):
                self._optimizer_step()
            self.global_steps += 1
            self.global_samples += self.batch.train_batch_size
            self.reporter.on_step()
        self.micro_steps += 1

    def _check_frozen(self) -> None:
        """[Note: frozen at initialize] Gradient buffers, buckets and ZeRO partitions are planned for
        the parameters that require grad when ``initialize()`` runs. A parameter unfrozen later would
        never be reduced (each rank would step on its own gradient), and one frozen later would still
        be stepped (weight decay, momentum) where plain PyTorch skips it: both are refused by name."""
        changed = [(n, planned) for n, p, planned in self._planned if p.requires_grad != planned]
        if changed:
            name, planned = changed[0]
            what = "frozen (requires_grad=False)" if planned else "unfrozen (requires_grad=True)"
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise RuntimeError(
                f"parameter '{name}' was {what} after initialize(){more}: "
                "shardspeed plans gradient buffers and ZeRO partitions for the parameters trainable at initialize(). "
                "Set requires_grad before initialize(), or build a new engine for the new set")

    def _optimizer_step(self) -> None:
        with self.timers("reduce_wait"):
            self.strategy.wait_reductions()  # with the optimizer in backward, this steps the last units
            if self.strategy.steps_in_backward and self.optimizer_swapper is not None:
                self.optimizer_swapper.drain()  # their state written back before anything reads it again
        if not self.strategy.steps_in_backward and not self._update():
            return
        self.strategy.after_step()
        self.strategy.zero_grad()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _update(self) -> bool:
        """Unscale, clip and step; False when an fp16 overflow skipped the step."""
        scale = self.loss_scale
        factor = 1.0 / scale
        # The global norm costs a full pass over the gradients: take it only when clipping or fp16
        # overflow detection needs it.
        if self.clip_norm > 0 or self.loss_scaler is not None:
            # one host sync per step (not two: isfinite() on the tensor would be another): the
            # clipping factor and the skip decision are both host-side choices
            norm_sq = self.strategy.grad_norm_sq().item()
            if not math.isfinite(norm_sq):
                self._skip_step(scale)
                return False
            if self.loss_scaler is not None:
                self.loss_scaler.update(overflow=False)
            norm = math.sqrt(norm_sq) / scale
            self._last_grad_norm = norm
            if self.clip_norm > 0:
                factor *= min(1.0, self.clip_norm / (norm + 1e-6))
        if factor != 1.0:
            self.strategy.scale_grads(factor)
        self.strategy.link_grads()
        if self.optimizer_swapper is not None:
            self.optimizer_swapper.step()
        else:
            self.optimizer.step()
        return True

    def _skip_step(self, scale: float) -> None:
        if self.loss_scaler is None:
            raise FloatingPointError(
                f"gradient norm is not finite at step {self.global_steps} (fp32/bf16 training has no loss scale "
                "to lower): check the loss for nan/inf or lower the learning rate")
        self.loss_scaler.update(overflow=True)
        self.skipped_steps += 1
        self.strategy.zero_grad()
        if get_rank() == 0:
            log.warning("step %d: fp16 gradient overflow, step skipped; loss scale %g -> %g",
                        self.global_steps, scale, self.loss_scaler.scale)

