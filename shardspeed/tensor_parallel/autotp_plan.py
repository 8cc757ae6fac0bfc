"""AutoTP's planner: which ``nn.Linear`` (and Hugging Face ``Conv1D``) of a plain model is cut by
columns, which by rows, and which stays whole, decided from module names and shapes. Pure: it reads
the model and changes nothing (``autotp.py`` applies a plan), so every decision is tested in-process.

[Note: what AutoTP slices]
A transformer block (an element of an ``nn.ModuleList``: GPT-2's ``transformer.h``, BERT's
``encoder.layer``, Llama's ``model.layers``) holds two regions that slice cleanly, attention and the
MLP, each a fan-out followed by a fan-in. Fan-out projections (q/k/v, a fused qkv, up/gate, fc_in)
are cut by columns and keep their outputs local, so each rank computes whole heads (or hidden units)
of its own; the fan-in projection (o/out_proj, c_proj, down_proj, fc_out) is cut by rows, takes that
local input and all-reduces its partial product. So every Linear inside a block must be placed: one
left whole between a column and a row layer would see 1/T of its input. A block that cuts by columns
must also cut by rows, and vice versa.

Outside the blocks (LM heads, poolers, classifier heads, BERT's prediction transform) everything
stays replicated: those layers run once per token after the blocks, most are small, and the large
one, the LM head, is tied to the input embedding in GPT-2, BERT and Llama; slicing it would untie it
unless the embedding were cut by vocabulary too, and the model's own loss (computed from full logits)
would then need a gather. Replicated, each tensor-parallel rank computes the same full logits and loss.

[Note: heads]
A column cut must fall between heads: rank r keeps heads [r·H/T, (r+1)·H/T) of q, of k and of v (of
each block of a fused qkv: ``stride``), so attention runs per rank on its own heads with no
communication. Where the attention module says its head size (``head_dim``, BERT's
``attention_head_size``), the planner checks that every projection's heads (key/value heads too,
for grouped-query attention) divide by T, naming the numbers. Attention modules that reshape by a
stored count are told the per-rank count (``HeadFix``): GPT-2 splits the fused output by
``split_size`` (also ``num_heads``, ``embed_dim``), BERT views by ``num_attention_heads`` and
``all_head_size``; Llama reshapes with ``-1`` and ``head_dim`` and keeps ``num_key_value_groups``
(q and kv heads both shrink by T), so it needs none. Every attribute named in ``_PER_RANK_ATTRS``
found on the module that owns a column-cut projection is divided by T.

[Note: plan patterns]
An explicit plan maps regular expressions to "column", "column:S" (S blocks fused along the output,
e.g. "column:3" for a fused q/k/v), "row" or "replicate". A pattern is searched (``re.search``) in
the module's qualified name and in its weight's name (``<module>.weight``), so both
``r"\\.c_attn$"`` and DeepSpeed's ``partition_config`` patterns (``".*\\.o_proj\\.weight$"``) work.
The first matching rule wins and rules come before the name rules below; a rule that matches no
Linear is an error (a typo would otherwise silently leave layers whole).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

Kind = Literal["column", "row", "replicate"]
KINDS: tuple[str, ...] = ("column", "row", "replicate")

# The name rules: the module's last name (or last two) inside a block.
_COLUMN = frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value", "q_attn", "gate_proj", "up_proj",
                     "fc_in", "c_fc", "fc1", "w1", "w3", "dense_h_to_4h", "intermediate.dense"})
_FUSED_QKV = frozenset({"c_attn"})  # q, k, v (k, v in cross-attention) side by side: stride = out / in
_ROW = frozenset({"o_proj", "out_proj", "c_proj", "down_proj", "fc_out", "fc2", "w2", "dense_4h_to_h",
                  "output.dense"})
# Integer attributes of an attention module that count heads or head features (Note: heads).
_PER_RANK_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads", "split_size",
                   "embed_dim", "all_head_size")
_HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size")


@dataclass(frozen=True)
class Rule:
    """One explicit plan entry: modules whose name matches ``pattern`` get ``kind``."""

    pattern: str
    kind: Kind
    stride: int = 1
    gather_output: bool = False  # a column layer that all-gathers its output (a head: no row partner)
    model_types: tuple[str, ...] | None = None  # only for models whose config.model_type is one of these

    def matches(self, name: str) -> bool:
        return bool(re.search(self.pattern, name) or re.search(self.pattern, f"{name}.weight"))


@dataclass(frozen=True)
class Placement:
    """The decision for one Linear: its qualified name, kind, and why."""

    name: str
    kind: Kind
    stride: int = 1
    gather_output: bool = False
    transposed: bool = False  # Hugging Face Conv1D: weight stored [in, out]
    reason: str = ""


@dataclass(frozen=True)
class HeadFix:
    """Per-rank values for the attributes an attention module reshapes by."""

    module: str
    values: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Plan:
    tp_size: int
    placements: tuple[Placement, ...]
    head_fixes: tuple[HeadFix, ...]

    def of(self, name: str) -> Placement:
        return next(p for p in self.placements if p.name == name)

    def sliced(self) -> list[Placement]:
        return [p for p in self.placements if p.kind != "replicate"]

    def summary(self) -> str:
        count = {k: sum(p.kind == k for p in self.placements) for k in KINDS}
        whole = ", ".join(p.name for p in self.placements if p.kind == "replicate") or "none"
        return (f"AutoTP at T={self.tp_size}: {count['column']} Linear cut by columns, {count['row']} by rows, "
                f"{count['replicate']} replicated ({whole})")

    def describe(self) -> str:
        """One line per Linear: name, kind (with stride), reason."""
        width = max((len(p.name) for p in self.placements), default=0)
        return "\n".join(f"{p.name:<{width}}  {p.kind + (f' x{p.stride}' if p.stride > 1 else ''):<10}  {p.reason}"
                         for p in self.placements)


def rules_from_dict(plan: Mapping[str, str]) -> list[Rule]:
    """``{pattern: "column" | "column:S" | "row" | "replicate"}`` as rules, in order (Note: plan patterns)."""
    rules = []
    for pattern, value in plan.items():
        kind, _, stride = str(value).partition(":")
        if kind not in KINDS or (stride and (kind != "column" or not stride.isdigit() or int(stride) < 1)):
            raise ValueError(f"AutoTP plan entry {pattern!r}: {value!r} is not one of \"column\", \"column:S\" "
                             "(S >= 1 blocks fused along the output, e.g. \"column:3\" for q/k/v), \"row\", "
                             "\"replicate\"")
        rules.append(Rule(_checked_regex(pattern), kind, int(stride or 1)))  # type: ignore[arg-type]
    return rules


def _checked_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"AutoTP plan pattern {pattern!r} is not a regular expression: {e}") from None
    return pattern


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, transposed)`` of an ``nn.Linear`` or a Hugging Face ``Conv1D``
    (weight [in, out]); None for anything else. Conv1D is recognised by its name and ``nf``/``nx``,
    so transformers is not imported here."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return int(module.nx), int(module.nf), True
    return None


def _blocks(model: nn.Module) -> list[str]:
    """Qualified names of the elements of every ``nn.ModuleList`` (the transformer blocks)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            out += [f"{name}.{child}" if name else child for child in m._modules]
    return out


def _block_of(name: str, blocks: list[str]) -> str | None:
    owners = [b for b in blocks if name.startswith(b + ".")]
    return min(owners, key=len) if owners else None  # the outermost: experts inside a layer belong to it


def _name_rule(name: str, inp: int, out: int) -> tuple[Kind, int, str] | None:
    parts = name.split(".")
    last, last_two = parts[-1], ".".join(parts[-2:])
    if last in _FUSED_QKV:
        if out % inp or out // inp not in (2, 3):
            return None
        return "column", out // inp, f"name {last}: fused projections, {out // inp} blocks of {inp}"
    for key in (last_two, last):
        if key in _COLUMN:
            return "column", 1, f"name {key}: fans out"
        if key in _ROW:
            return "row", 1, f"name {key}: fans in"
    return None


@dataclass
class _Linear:
    name: str
    inp: int
    out: int
    transposed: bool
    block: str | None
    parent: nn.Module
    inside_mha: bool


def _linears(model: nn.Module) -> list[_Linear]:
    blocks, found = _blocks(model), []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent._modules.items():
            shape = linear_shape(child) if child is not None else None
            if shape is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            found.append(_Linear(name, shape[0], shape[1], shape[2], _block_of(name, blocks), parent,
                                 isinstance(parent, nn.MultiheadAttention)))
    return found


def _tied(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name it goes by, for parameters shared by several modules (tied)."""
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    return {n: ns for ns in names.values() if len(ns) > 1 for n in ns}


def plan_autotp(model: nn.Module, tp_size: int, plan: Mapping[str, str] | Sequence[Rule] | None = None, *,
                use_default_rules: bool = True, strict: bool = False) -> Plan:
    """Decide, for ``tp_size`` ranks, how each Linear of ``model`` is sliced (see the module notes).

    Args:
        model: the unsliced model (read only).
        tp_size: the tensor-parallel size T.
        plan: explicit rules, ``{regex: "column" | "column:S" | "row" | "replicate"}`` or ``Rule``s,
            tried first, in order.
        use_default_rules: also place Linears by their names (q_proj, c_attn, down_proj, ...).
        strict: every Linear must be placed by a rule or a name rule; no "outside the blocks, stay
            whole" default (DeepSpeed's ``strict_mode``).
    Raises:
        ValueError: naming every Linear in a block that could not be placed, every size or head
            count that does not divide by T, a pattern that matches nothing, a sliced weight that is
            tied to another module.
    """
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"AutoTP: tensor-parallel size must be an integer >= 1, got {tp_size!r}")
    rules = rules_from_dict(plan) if isinstance(plan, Mapping) else list(plan or [])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    rules = [r for r in rules if r.model_types is None or model_type in r.model_types]
    linears, tied = _linears(model), _tied(model)
    used: set[str] = set()
    placements, unplaced, problems = [], [], []
    for lin in linears:
        rule = next((r for r in rules if r.matches(lin.name)), None)
        if rule is not None:
            used.add(rule.pattern)
            decision: tuple[Kind, int, str] | None = (rule.kind, rule.stride, f"plan {rule.pattern!r}")
        elif lin.inside_mha:  # it multiplies by out_proj.weight itself: the module never runs
            decision = ("replicate", 1, "inside nn.MultiheadAttention (uses its weights directly): stays whole")
        else:
            decision = _name_rule(lin.name, lin.inp, lin.out) if use_default_rules and lin.block else None
        if decision is None and lin.block is None and not strict:
            decision = ("replicate", 1, "outside the blocks: stays whole")
        if decision is None:
            unplaced.append(lin)
            continue
        kind, stride, reason = decision
        gather = rule.gather_output if rule is not None and kind == "column" else False
        if kind != "replicate":
            problems += _sliceable(lin, kind, stride, tp_size, tied)
        placements.append(Placement(lin.name, kind, stride, gather, lin.transposed, reason))
    example = next((lin.name for lin in linears if lin.block), linears[0].name if linears else "")
    problems += [f"plan pattern {r.pattern!r} matches no Linear or Conv1D module (names look like {example!r})"
                 for r in rules if r.pattern not in used]
    if unplaced:
        problems.append(_unplaced_message(unplaced, tp_size))
    elif not problems and not any(p.kind != "replicate" for p in placements):
        problems.append(f"AutoTP found no Linear to slice in {type(model).__name__}: give the plan explicitly "
                        f"({_HOW})")
    by_name = {lin.name: lin for lin in linears}
    if not unplaced:  # with layers missing, which cut lacks its partner is not known yet
        problems += _block_pairing(placements, by_name)
    fixes = _head_fixes(placements, by_name, tp_size, problems)
    if problems:
        raise ValueError("\n".join(problems))
    return Plan(tp_size, tuple(placements), tuple(fixes))


_HOW = ("shardspeed.tensor_parallel.autotp(model, T, plan={r'\\.name$': 'column' | 'column:3' | 'row' | "
        "'replicate'}), or in the config \"tensor_parallel\": {\"autotp_size\": T, \"partition_config\": "
        "{\"layer_specs\": [{\"patterns\": [\"\\\\.name$\"], \"partition_type\": \"column\" | \"row\" | \"skip\"}]}}")


def _unplaced_message(unplaced: list[_Linear], tp_size: int) -> str:
    lines = []
    for lin in unplaced:
        where = f"in block {lin.block}" if lin.block else "outside the blocks (strict mode)"
        lines.append(f"  {lin.name} ({'Conv1D' if lin.transposed else 'Linear'} {lin.inp}->{lin.out}, {where})")
    return (f"AutoTP cannot place {len(unplaced)} Linear layer(s) for T={tp_size}; their names are not ones it "
            f"knows:\n" + "\n".join(lines) + f"\n(columns: {', '.join(sorted(_COLUMN | _FUSED_QKV))}; rows: "
            f"{', '.join(sorted(_ROW))})\nGive the plan explicitly: {_HOW}")


def _head_size(parent: nn.Module) -> int | None:
    for attr in _HEAD_SIZE_ATTRS:
        value = getattr(parent, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _sliceable(lin: _Linear, kind: Kind, stride: int, tp_size: int, tied: dict[str, list[str]]) -> list[str]:
    """Why ``lin`` cannot be cut ``kind`` T ways (empty when it can)."""
    if lin.inside_mha:
        return [f"{lin.name}: inside nn.MultiheadAttention, which uses its weights directly; it cannot be "
                f"sliced (plan it \"replicate\")"]
    for own in (f"{lin.name}.weight", f"{lin.name}.bias"):
        if own in tied:
            others = ", ".join(n for n in tied[own] if n != own)
            return [f"{lin.name}: {own} is tied to {others}; slicing it would untie them (plan it \"replicate\")"]
    size, what = (lin.out // stride, "output") if kind == "column" else (lin.inp, "input")
    if kind == "column" and lin.out % stride:
        return [f"{lin.name}: {lin.out} output features are not {stride} equal blocks"]
    if size % tp_size:
        blocks = f" (each of {stride} blocks)" if stride > 1 else ""
        return [f"{lin.name}: {size} {what} features{blocks} are not divisible by the tensor-parallel size {tp_size}"]
    head = _head_size(lin.parent)
    if head is not None and size % head == 0 and (size // head) % tp_size:
        return [f"{lin.name}: its {size} {what} features{' per block' if stride > 1 else ''} are {size // head} "
                f"heads of {head}, which are not divisible by the tensor-parallel size {tp_size}"]
    return []


def _block_pairing(placements: list[Placement], by_name: dict[str, _Linear]) -> list[str]:
    kinds: dict[str, set[str]] = {}
    for p in placements:
        block = by_name[p.name].block
        if block is not None and p.kind != "replicate" and not p.gather_output:
            kinds.setdefault(block, set()).add(p.kind)
    return [f"block {b}: AutoTP cuts Linears by {next(iter(k))}s only; a column cut must feed a row cut "
            f"(each rank's partial features are summed by the row layer): plan the matching layers"
            for b, k in kinds.items() if len(k) == 1]


def _head_fixes(placements: list[Placement], by_name: dict[str, _Linear], tp_size: int,
                problems: list[str]) -> list[HeadFix]:
    """Per-rank head counts for the modules that own a column-cut projection (Note: heads)."""
    owners: dict[int, str] = {}
    for p in placements:
        if p.kind == "column" and not p.gather_output:
            owners.setdefault(id(by_name[p.name].parent), p.name.rpartition(".")[0])
    modules = {id(lin.parent): lin.parent for lin in by_name.values()}
    fixes = []
    for key, owner in owners.items():
        values = []
        for attr in _PER_RANK_ATTRS:
            value = getattr(modules[key], attr, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value % tp_size:
                problems.append(f"{owner}.{attr} = {value} is not divisible by the tensor-parallel size {tp_size}")
            values.append((attr, value // tp_size))
        if values:
            fixes.append(HeadFix(owner, tuple(values)))
    return fixes
