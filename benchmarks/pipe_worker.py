"""One pipeline run of bench_pipe.py on P local ranks (1 thread each): library ``--lib`` (shardspeed,
deepspeed or torch) trains the GPT layers of ``examples/pipeline_gpt/layers.py`` (untied head, see
bench_pipe.py) with P stages and m micro-batches per step for every m of ``--ms``, then every rank
times its stage alone to give the ideal step time. Rank 0 appends one row per m to
benchmarks/out/pipe.jsonl.

Runs in our venv (shardspeed, torch) or in DeepSpeed's (deepspeed): it imports only torch, the
example's layers, and the library it measures. With several libraries (``--lib a,b,c``, from
DeepSpeed's venv) they share one process group and take turns (``interleaved``).

[Note: what a step time holds]
``step_s`` is the loop's wall time over ``--steps`` steps after ``--warmup`` steps, from a barrier
before the first to a barrier after the last, divided by the steps: forward and backward of every
micro-batch, the p2p between stages, and the optimizer step, as each library's own step function
(``train_batch``, ``schedule.step`` + ``optimizer.step``) does them. Data is generated before the
loop. The first step's loss is recorded outside timing (it is step 1 of the warm-up).

Interleaved, the loop is cut into ``--rounds`` turns of ``--steps / --rounds`` steps per library,
each between barriers, and ``step_s`` is their sum over all the library's steps.

[Note: the ideal step time]
After the runs, every rank builds its stage's layers as plain modules (same partition, same
values) and times ``--calib`` forward+backward passes of one micro-batch on them (the last stage
includes the loss), all ranks at once (a barrier before each pass, so the P ranks share the cores
as they do in a pipeline's steady state), and ``--calib`` optimizer steps (AdamW, the stage's
parameters). Per stage: the median. The ideal step for m micro-batches on p stages is
``m * sum_s(t_s) / p / (1 - bubble) + max_s(opt_s)``, bubble = (p-1)/(m+p-1): the single-stage compute
split perfectly over p stages, stretched by the 1F1B bubble, plus the optimizer step (the slowest
stage's). ``ideal_slowest_s`` replaces the mean stage time by the slowest stage's, the bound for this
partition: ``(m+p-1) * max_s(t_s) + max_s(opt_s)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from examples.gpt_model import GPTConfig, synthetic_batch  # noqa: E402
from examples.pipeline_gpt.layers import build_layers, gpt_layer_plan, to_specs  # noqa: E402

PARTITION = "type:Block|Head"  # one unit per block and for the head (~ a block's compute); embedding, norm: 0
BASE_SEED = 1234


def args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True, help="shardspeed, shardspeed_whole, deepspeed or torch; several, "
                    "comma-separated: interleaved in one process group (run in DeepSpeed's venv)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved: turns per library")
    ap.add_argument("--ms", default="4,8,16", help="micro-batches per step, in the order run")
    ap.add_argument("--micro", type=int, default=2, help="micro-batch size")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=3072)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--rep", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "pipe.jsonl"))
    return ap


def optimizer(params):
    return torch.optim.AdamW(params, lr=ARGS.lr, weight_decay=0.01, fused=True)


def global_batches(cfg: GPTConfig, m: int, steps: int):
    """Step k's global batch (m * micro rows) as m micro-batches, row blocks in order: what
    torch.distributed.pipelining's default chunking along dim 0 makes of the whole batch."""
    out = []
    for k in range(steps):
        x, y = synthetic_batch(k, m * ARGS.micro, cfg.seq, cfg.vocab)
        out.append((x, y, list(zip(x.chunk(m), y.chunk(m), strict=True))))
    return out


# -- the three libraries: (parts, step(batch) -> loss or None) for one m ---------------------------------------
def setup_shardspeed(plan, loss_fn, p: int, m: int, early_grads: bool = True):
    import shardspeed
    from shardspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    module = PipelineModule(to_specs(plan, LayerSpec, TiedLayerSpec), num_stages=p, loss_fn=loss_fn,
                            seed_layers=True, base_seed=BASE_SEED, partition_method=PARTITION)
    cfg = {"train_micro_batch_size_per_gpu": ARGS.micro, "gradient_accumulation_steps": m,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
           "pipeline": {"early_grads": early_grads}}
    engine, _, _, _ = shardspeed.initialize(model=module, optimizer=optimizer(module.parameters()), config=cfg)
    return module.partitions(), lambda batch: float(engine.train_batch(iter(batch[2])))


def setup_deepspeed(plan, loss_fn, p: int, m: int):
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    # seed_fn: DeepSpeed's own per-layer seeding passes a numpy integer (its partition's stage boundary
    # + the layer's offset) to random.seed, which Python 3.11 refuses (TypeError); torch.manual_seed of
    # the same number is what shardspeed's seed_layers and build_layers do
    module = PipelineModule(to_specs(plan, LayerSpec, TiedLayerSpec), num_stages=p, loss_fn=loss_fn,
                            seed_layers=True, seed_fn=lambda seed: torch.manual_seed(int(seed)), base_seed=BASE_SEED,
                            partition_method=PARTITION)
    # gradient_clipping: DeepSpeed 0.19.8 defaults it to 1.0; the others do not clip
    cfg = {"train_micro_batch_size_per_gpu": ARGS.micro, "gradient_accumulation_steps": m,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
           "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer(module.parameters()), config=cfg)
    return [int(v) for v in module.parts], lambda batch: float(engine.train_batch(iter(batch[2])))


def setup_torch(plan, loss_fn, p: int, m: int):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from shardspeed.pipe.partition import layer_type_weights, partition_balanced

    parts = partition_balanced(layer_type_weights(plan_as_specs(plan), PARTITION[len("type:"):]), p)
    s = dist.get_rank()
    stage_mod = torch.nn.Sequential(*build_layers(plan, range(parts[s], parts[s + 1]), base_seed=BASE_SEED))
    stage = PipelineStage(stage_mod, stage_index=s, num_stages=p, device=torch.device("cpu"))
    sched = Schedule1F1B(stage, n_microbatches=m, loss_fn=loss_fn, scale_grads=True)
    opt = optimizer(stage_mod.parameters())

    def step(batch):
        opt.zero_grad(set_to_none=True)
        if s == 0:
            sched.step(batch[0], return_outputs=False)
            loss = None
        elif s == p - 1:
            losses: list = []
            sched.step(target=batch[1], losses=losses, return_outputs=False)
            loss = float(torch.stack(losses).detach().mean())
        else:
            sched.step(return_outputs=False)
            loss = None
        opt.step()
        return loss

    return parts, step


def plan_as_specs(plan):
    """The plan as shardspeed LayerSpecs, only to run shardspeed's partitioner on it for the torch run
    (which has no partitioner of its own); available in our venv, where the torch run runs."""
    from shardspeed.pipe import LayerSpec, TiedLayerSpec

    return to_specs(plan, LayerSpec, TiedLayerSpec)


SETUP = {"shardspeed": setup_shardspeed, "deepspeed": setup_deepspeed, "torch": setup_torch,
         # the same engine with every gradient sent after its whole backward (schedule.py, Note: early gradient sends)
         "shardspeed_whole": lambda plan, loss_fn, p, m: setup_shardspeed(plan, loss_fn, p, m, early_grads=False)}


# -- the ideal: each stage alone --------------------------------------------------------------------------------
class Stage:
    """This rank's stage as plain modules (same partition and values) for the ideal (Note: the ideal)."""

    def __init__(self, plan, loss_fn, parts, cfg: GPTConfig):
        self.p, self.s = len(parts) - 1, dist.get_rank()
        self.model = torch.nn.Sequential(*build_layers(plan, range(parts[self.s], parts[self.s + 1]),
                                                       base_seed=BASE_SEED))
        self.params = list(self.model.parameters())
        self.opt = optimizer(self.params)
        self.loss_fn = loss_fn
        x, self.y = synthetic_batch(10**6, ARGS.micro, cfg.seq, cfg.vocab)
        self.inp = x
        if self.s > 0:  # the input a later stage receives: the previous stages' activations
            with torch.no_grad():
                prev = torch.nn.Sequential(*build_layers(plan, range(0, parts[self.s]), base_seed=BASE_SEED))
                self.inp = prev(x)
        self.grad = torch.randn(ARGS.micro, cfg.seq, cfg.hidden) * 1e-3
        for _ in range(2):
            self._fwd_bwd()

    def _fwd_bwd(self) -> None:
        h = self.inp.detach().requires_grad_() if self.s > 0 else self.inp
        out = self.model(h)
        if self.s == self.p - 1:
            self.loss_fn(out, self.y).backward()
        else:
            out.backward(self.grad)

    def times(self, n: int) -> tuple[list[float], list[float]]:
        """n forward+backward passes and n optimizer steps, each after a barrier: their seconds."""
        fb, opt = [], []
        for _ in range(n):
            dist.barrier()
            t = time.perf_counter()
            self._fwd_bwd()
            fb.append(time.perf_counter() - t)
        for _ in range(n):
            dist.barrier()
            t = time.perf_counter()
            self.opt.step()
            opt.append(time.perf_counter() - t)
        return fb, opt


def calibrate(plan, loss_fn, parts, cfg: GPTConfig) -> dict:
    """Per-micro-batch forward+backward and optimizer-step seconds of this rank's stage (Note: the ideal)."""
    stage = Stage(plan, loss_fn, parts, cfg)
    fb, opt = stage.times(ARGS.calib)
    return {"fb_s": statistics.median(fb), "opt_s": statistics.median(opt),
            "params": sum(q.numel() for q in stage.params)}


def interleaved(libs: list[str], plan, loss_fn, cfg: GPTConfig, p: int, m: int) -> list[dict]:
    """All ``libs`` in this one process group, taking turns: ``--rounds`` rounds, each giving every
    library ``--steps // --rounds`` timed steps and the stage timing ``--calib // --rounds`` passes,
    in an order rotated every round, so load from outside hits every library and the ideal alike."""
    per_round = max(1, ARGS.steps // ARGS.rounds)
    data = global_batches(cfg, m, ARGS.warmup + ARGS.rounds * per_round)
    runs = {lib: SETUP[lib](plan, loss_fn, p, m) for lib in libs}
    parts = {lib: r[0] for lib, r in runs.items()}
    stage = Stage(plan, loss_fn, parts[libs[0]], cfg)
    losses = {lib: [runs[lib][1](data[k]) for k in range(ARGS.warmup)] for lib in libs}
    walls: dict[str, list[float]] = {lib: [] for lib in libs}
    cpus: dict[str, list[float]] = {lib: [] for lib in libs}  # this process's CPU seconds (all its threads)
    mains: dict[str, list[float]] = {lib: [] for lib in libs}  # the main thread's alone
    fb: list[float] = []
    opt: list[float] = []
    order = [*libs, "ideal"]
    for r in range(ARGS.rounds):
        for lib in order[r % len(order):] + order[:r % len(order)]:
            if lib == "ideal":
                f, o = stage.times(max(1, ARGS.calib // ARGS.rounds))
                fb += f
                opt += o
                continue
            dist.barrier()
            t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            for k in range(ARGS.warmup + r * per_round, ARGS.warmup + (r + 1) * per_round):
                losses[lib].append(runs[lib][1](data[k]))
            dist.barrier()
            walls[lib].append(time.perf_counter() - t0)
            cpus[lib].append(time.process_time() - c0)
            mains[lib].append(time.thread_time() - m0)
    cal = {"fb_s": statistics.median(fb), "opt_s": statistics.median(opt),
           "params": sum(q.numel() for q in stage.params)}
    cals = [None] * p
    dist.all_gather_object(cals, cal)
    rows = []
    for lib in libs:
        last = torch.tensor([v if v is not None else float("nan") for v in losses[lib]], dtype=torch.float64)
        dist.broadcast(last, src=p - 1)
        step_s = sum(walls[lib]) / (ARGS.rounds * per_round)
        # CPU seconds per step, summed over ranks: on fewer cores than ranks, this is what the step time follows
        cpu = torch.tensor([sum(cpus[lib]), sum(mains[lib])], dtype=torch.float64) / (ARGS.rounds * per_round)
        dist.all_reduce(cpu)
        rows.append({"lib": lib, "p": p, "m": m, "step_s": step_s, "losses": last.tolist(), "parts": parts[lib],
                     "round_step_s": [w / per_round for w in walls[lib]], "interleaved": libs,
                     "cpu_s_per_step_all_ranks": float(cpu[0]), "main_thread_cpu_s_per_step_all_ranks": float(cpu[1]),
                     "load_avg": os.getloadavg()[0], "stages": cals})
        if dist.get_rank() == 0:
            print(f"{lib} P={p} m={m}: {step_s:.3f} s/step (rounds {[round(w / per_round, 3) for w in walls[lib]]})"
                  f", cpu {float(cpu[0]):.3f} s/step over ranks (main threads {float(cpu[1]):.3f})"
                  f", loss {last[0]:.6f} -> {last[-1]:.6f}, parts {parts[lib]}", flush=True)
    return rows


def main() -> None:
    global ARGS
    ARGS = args_parser().parse_args()
    torch.set_num_threads(1)
    libs = ARGS.lib.split(",")
    if "deepspeed" in libs:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, p = dist.get_rank(), dist.get_world_size()
    cfg = GPTConfig(vocab=ARGS.vocab, seq=ARGS.seq, layers=ARGS.layers, hidden=ARGS.hidden, heads=ARGS.heads)
    plan, loss_fn = gpt_layer_plan(cfg, tp=1, tied=False)
    rows: list[dict] = []
    parts = None
    for m in [int(v) for v in ARGS.ms.split(",")]:
        if len(libs) > 1:
            rows += interleaved(libs, plan, loss_fn, cfg, p, m)
            continue
        data = global_batches(cfg, m, ARGS.warmup + ARGS.steps)
        parts, step = SETUP[ARGS.lib](plan, loss_fn, p, m)
        losses = [step(data[k]) for k in range(ARGS.warmup)]
        dist.barrier()
        t0 = time.perf_counter()
        marks = [t0]  # this rank's step ends, for the spread (no barrier inside the loop)
        for k in range(ARGS.warmup, ARGS.warmup + ARGS.steps):
            losses.append(step(data[k]))
            marks.append(time.perf_counter())
        dist.barrier()
        step_s = (time.perf_counter() - t0) / ARGS.steps
        # the losses as the last stage saw them (torch's schedule returns them there only)
        last = torch.tensor([v if v is not None else float("nan") for v in losses], dtype=torch.float64)
        dist.broadcast(last, src=p - 1)
        rows.append({"lib": ARGS.lib, "p": p, "m": m, "step_s": step_s, "losses": last.tolist(), "parts": parts,
                     "rank0_step_times": [b - a for a, b in zip(marks, marks[1:], strict=False)],
                     "load_avg": os.getloadavg()[0]})
        if rank == 0:
            print(f"{ARGS.lib} P={p} m={m}: {step_s:.3f} s/step, loss {last[0]:.6f} -> {last[-1]:.6f}, "
                  f"parts {parts}", flush=True)
    if len(libs) == 1:
        cal = calibrate(plan, loss_fn, parts, cfg)
        cals = [None] * p
        dist.all_gather_object(cals, cal)
        for r in rows:
            r["stages"] = cals
    if rank == 0:
        with open(ARGS.out, "a") as f:
            for r in rows:
                r.update(tag=ARGS.tag, rep=ARGS.rep, micro=ARGS.micro, steps=ARGS.steps, warmup=ARGS.warmup,
                         model={"hidden": cfg.hidden, "heads": cfg.heads, "layers": cfg.layers, "seq": cfg.seq,
                                "vocab": cfg.vocab}, torch=torch.__version__,
                         cpu=torch.backends.cpu.get_cpu_capability())
                if "deepspeed" in libs:
                    import deepspeed

                    r["deepspeed"] = deepspeed.__version__
                f.write(json.dumps(r) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
