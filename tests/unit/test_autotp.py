"""AutoTP in one process: the planner's decisions on Hugging Face GPT-2, BERT and Llama built from a
config, explicit plans, every message a user reads, ``from_linear``, the config section, and the
plan applied at T = 1 (the sliced run on real ranks is tests/distributed/test_autotp.py)."""

import re

import pytest
import torch
import torch.nn as nn

from shardspeed import comm
from shardspeed import tensor_parallel as tp
from shardspeed.config import ConfigError, load_config
from shardspeed.tensor_parallel.autotp import rules_from_partition_config
from tests.distributed.hf_models import hf_batch, hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _no_unit():
    comm.destroy_model_parallel()
    yield
    comm.destroy_model_parallel()


def _kinds(plan):
    return {p.name: (p.kind, p.stride) for p in plan.placements}


def _layer(plan, index):
    """The placements of block ``index``, names relative to it, plus those outside every block."""
    out = {}
    for name, kind in _kinds(plan).items():
        m = re.match(rf"^(.*?\.)?{index}\.(.*)$", name)
        if m:
            out[m.group(2)] = kind
        elif not re.search(r"\.\d+\.", name):
            out[name] = kind
    return out


def test_gpt2_fused_qkv_by_columns_of_three_blocks_projections_by_rows_lm_head_whole():
    plan = tp.plan_autotp(hf_model("gpt2"), 2)
    assert _layer(plan, 0) == {"attn.c_attn": ("column", 3), "attn.c_proj": ("row", 1), "mlp.c_fc": ("column", 1),
                               "mlp.c_proj": ("row", 1), "lm_head": ("replicate", 1)}
    assert all(p.transposed for p in plan.placements if p.name != "lm_head")  # Conv1D: [in, out]
    assert plan.of("lm_head").reason == "outside the blocks: stays whole"
    # GPT-2 splits the fused output by split_size: each rank holds 2 of the 4 heads, 16 features
    assert [(f.module, dict(f.values)) for f in plan.head_fixes] == [
        (f"transformer.h.{i}.attn", {"num_heads": 2, "split_size": 16, "embed_dim": 16}) for i in (0, 1)]
    assert plan.summary() == "AutoTP at T=2: 4 Linear cut by columns, 4 by rows, 1 replicated (lm_head)"


def test_gpt2_cross_attention_fuses_two_blocks():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64,
                                                                 add_cross_attention=True))
    layer = _layer(tp.plan_autotp(model, 2), 0)
    assert layer["crossattention.c_attn"] == ("column", 2) and layer["crossattention.q_attn"] == ("column", 1)
    assert layer["crossattention.c_proj"] == ("row", 1) and layer["attn.c_attn"] == ("column", 3)


def test_bert_query_key_value_intermediate_by_columns_outputs_by_rows_heads_whole():
    plan = tp.plan_autotp(hf_model("bert"), 2)
    assert _layer(plan, 0) == {
        "attention.self.query": ("column", 1), "attention.self.key": ("column", 1),
        "attention.self.value": ("column", 1), "attention.output.dense": ("row", 1),
        "intermediate.dense": ("column", 1), "output.dense": ("row", 1),
        # the MLM head: transform and decoder (tied to the word embeddings) stay whole
        "cls.predictions.transform.dense": ("replicate", 1), "cls.predictions.decoder": ("replicate", 1)}
    assert [(f.module, dict(f.values)) for f in plan.head_fixes] == [
        (f"bert.encoder.layer.{i}.attention.self", {"num_attention_heads": 2, "all_head_size": 16}) for i in (0, 1)]
    pooled = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=32,
                                                            num_attention_heads=4, intermediate_size=64))
    assert tp.plan_autotp(pooled, 2).of("pooler.dense").kind == "replicate"


def test_llama_qkv_gate_up_by_columns_o_down_by_rows_no_head_attributes_to_fix():
    plan = tp.plan_autotp(hf_model("llama"), 2)
    assert _layer(plan, 1) == {
        "self_attn.q_proj": ("column", 1), "self_attn.k_proj": ("column", 1), "self_attn.v_proj": ("column", 1),
        "self_attn.o_proj": ("row", 1), "mlp.gate_proj": ("column", 1), "mlp.up_proj": ("column", 1),
        "mlp.down_proj": ("row", 1), "lm_head": ("replicate", 1)}
    # Llama reshapes with -1 and head_dim, and q and kv heads both shrink by T: nothing to tell it
    assert plan.head_fixes == ()


def test_heads_that_do_not_divide_are_named_with_their_numbers():
    with pytest.raises(ValueError) as e:
        tp.plan_autotp(hf_model("llama"), 4)  # 4 query heads, 2 key/value heads of 8 features
    assert str(e.value).splitlines()[:2] == [
        "model.layers.0.self_attn.k_proj: its 16 output features are 2 heads of 8, which are not divisible by the "
        "tensor-parallel size 4",
        "model.layers.0.self_attn.v_proj: its 16 output features are 2 heads of 8, which are not divisible by the "
        "tensor-parallel size 4"]
    with pytest.raises(ValueError) as e:
        tp.plan_autotp(hf_model("gpt2"), 8)
    lines = str(e.value).splitlines()
    assert lines[0] == ("transformer.h.0.attn.c_attn: its 32 output features per block are 4 heads of 8, which are "
                        "not divisible by the tensor-parallel size 8")
    assert "transformer.h.0.attn.num_heads = 4 is not divisible by the tensor-parallel size 8" in lines


def test_hidden_sizes_that_do_not_divide_are_named():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=66,
        vocab_size=64))
    with pytest.raises(ValueError) as e:
        tp.plan_autotp(model, 4)
    assert str(e.value).splitlines() == [
        "model.layers.0.mlp.gate_proj: 66 output features are not divisible by the tensor-parallel size 4",
        "model.layers.0.mlp.up_proj: 66 output features are not divisible by the tensor-parallel size 4",
        "model.layers.0.mlp.down_proj: 66 input features are not divisible by the tensor-parallel size 4"]


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(16, 16), nn.Linear(16, 16)
        self.router = nn.Linear(16, 4)


class _Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(16, 3)


def test_an_unplaceable_linear_in_a_block_is_named_with_how_to_give_the_plan():
    with pytest.raises(ValueError) as e:
        tp.plan_autotp(_Routed(), 2)
    lines = str(e.value).splitlines()
    assert lines[:3] == ["AutoTP cannot place 2 Linear layer(s) for T=2; their names are not ones it knows:",
                         "  layers.0.router (Linear 16->4, in block layers.0)",
                         "  layers.1.router (Linear 16->4, in block layers.1)"]
    assert lines[3] == ("(columns: c_attn, c_fc, dense_h_to_4h, fc1, fc_in, gate_proj, intermediate.dense, k_proj, "
                        "key, q_attn, q_proj, query, up_proj, v_proj, value, w1, w3; rows: c_proj, dense_4h_to_h, "
                        "down_proj, fc2, fc_out, o_proj, out_proj, output.dense, w2)")
    assert lines[4] == (
        "Give the plan explicitly: shardspeed.tensor_parallel.autotp(model, T, plan={r'\\.name$': 'column' | "
        "'column:3' | 'row' | 'replicate'}), or in the config \"tensor_parallel\": {\"autotp_size\": T, "
        "\"partition_config\": {\"layer_specs\": [{\"patterns\": [\"\\\\.name$\"], \"partition_type\": \"column\" | "
        "\"row\" | \"skip\"}]}}")
    # the plan it asks for: the router stays whole (every rank routes alike), the rest by name
    plan = tp.plan_autotp(_Routed(), 2, {r"\.router$": "replicate"})
    assert _layer(plan, 0) == {"q_proj": ("column", 1), "o_proj": ("row", 1), "router": ("replicate", 1),
                               "head": ("replicate", 1)}
    assert plan.of("layers.0.router").reason == "plan '\\\\.router$'"


def test_explicit_plan_comes_first_and_deepspeed_weight_patterns_match():
    plan = tp.plan_autotp(hf_model("gpt2"), 2, {r".*\.attn\.c_attn\.weight$": "column:3", r"mlp\.c_fc": "column",
                                                r"\.c_proj$": "row"}, use_default_rules=False)
    assert _layer(plan, 1) == {"attn.c_attn": ("column", 3), "attn.c_proj": ("row", 1), "mlp.c_fc": ("column", 1),
                               "mlp.c_proj": ("row", 1), "lm_head": ("replicate", 1)}
    # first match wins: the whole MLP of layer 0 kept whole, everything else by name
    plan = tp.plan_autotp(hf_model("gpt2"), 2, {r"h\.0\.mlp\.": "replicate"})
    assert _layer(plan, 0)["mlp.c_fc"] == ("replicate", 1) and _layer(plan, 1)["mlp.c_fc"] == ("column", 1)


@pytest.mark.parametrize("plan, message", [
    ({r"\.c_atn$": "column:3"}, "plan pattern '\\\\.c_atn$' matches no Linear or Conv1D module (names look like "
                                "'transformer.h.0.attn.c_attn')"),
    ({"c_attn": "colum"}, "AutoTP plan entry 'c_attn': 'colum' is not one of \"column\", \"column:S\" (S >= 1 "
                          "blocks fused along the output, e.g. \"column:3\" for q/k/v), \"row\", \"replicate\""),
    ({"c_attn": "row:3"}, None),
    ({"(": "row"}, "AutoTP plan pattern '(' is not a regular expression: missing ), unterminated subpattern at "
                   "position 0"),
    ({"^lm_head$": "column"}, "lm_head: lm_head.weight is tied to transformer.wte.weight; slicing it would untie "
                              "them (plan it \"replicate\")"),
    ({r"\.c_proj$": "replicate"}, "block transformer.h.0: AutoTP cuts Linears by columns only; a column cut must "
                                  "feed a row cut (each rank's partial features are summed by the row layer): plan "
                                  "the matching layers"),
])
def test_bad_plans_are_refused_with_what_was_wrong(plan, message):
    with pytest.raises(ValueError) as e:
        tp.plan_autotp(hf_model("gpt2"), 2, plan)
    assert str(e.value).splitlines()[0] == (message or str(e.value).splitlines()[0])
    if message is None:
        assert "'row:3' is not one of" in str(e.value)


def test_strict_mode_places_heads_too_and_a_model_with_nothing_to_slice_is_refused():
    with pytest.raises(ValueError, match=r"  lm_head \(Linear 32->96, outside the blocks \(strict mode\)\)"):
        tp.plan_autotp(hf_model("gpt2"), 2, strict=True)
    assert tp.plan_autotp(hf_model("gpt2"), 2, {"^lm_head$": "replicate"}, strict=True).of("lm_head").kind \
        == "replicate"
    with pytest.raises(ValueError, match="AutoTP found no Linear to slice in Sequential: give the plan explicitly"):
        tp.plan_autotp(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), 2)
    with pytest.raises(ValueError, match="tensor-parallel size must be an integer >= 1, got 0"):
        tp.plan_autotp(hf_model("gpt2"), 0)


def test_multihead_attention_stays_whole_and_refuses_to_be_sliced():
    model = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32)])
    plan = tp.plan_autotp(model, 2, {r"linear1$": "column", r"linear2$": "row"})
    assert plan.of("0.self_attn.out_proj").kind == "replicate"
    with pytest.raises(ValueError, match=r"0.self_attn.out_proj: inside nn.MultiheadAttention, which uses its "
                                         r"weights directly; it cannot be sliced \(plan it \"replicate\"\)"):
        tp.plan_autotp(model, 2, {r"out_proj$": "row", r"linear1$": "column", r"linear2$": "row"})


def test_from_linear_copies_the_layer_draws_nothing_and_keeps_requires_grad():
    torch.manual_seed(0)
    linear = nn.Linear(6, 9)
    linear.bias.requires_grad_(False)
    conv = transformers.pytorch_utils.Conv1D(9, 6)  # weight [in 6, out 9]
    x = torch.randn(2, 6)
    state = torch.get_rng_state()
    col = tp.ColumnParallelLinear.from_linear(linear, stride=3)
    row = tp.RowParallelLinear.from_linear(conv, transposed=True, input_is_parallel=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(col(x), linear(x)) and torch.allclose(row(x), conv(x), atol=1e-6)
    assert tp.slice_spec(col.weight) == tp.SliceSpec(0, 3) and tp.slice_spec(col.bias) == tp.SliceSpec(0, 3)
    # a Conv1D keeps its [in, out] layout: the row cut is on its dim 0
    assert tp.slice_spec(row.weight) == tp.SliceSpec(0) and row.weight.shape == conv.weight.shape
    assert tp.slice_spec(row.bias) is None
    assert not col.bias.requires_grad and col.weight.requires_grad


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_applied_at_t1_the_model_computes_what_it_did(kind):
    model = hf_model(kind)
    batch = hf_batch(0, 2)
    want = model(**batch).logits
    tp.autotp(model)  # no unit: T = 1, every planned layer replaced by its (whole) tensor-parallel twin
    types = {type(m).__name__ for m in model.modules()}
    assert {"ColumnParallelLinear", "RowParallelLinear"} <= types and tp.is_tensor_parallel(model)
    assert torch.allclose(model(**batch).logits, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"autotp\(tp_size=2\) but the tensor-parallel group has 1 rank\(s\): call "
                                         r"shardspeed.initialize_model_parallel\(tensor_parallel_size=2\) first"):
        tp.autotp(hf_model(kind), 2)


# -- the config section ---------------------------------------------------------------------------------
def test_partition_config_becomes_rules_in_order():
    cfg = load_config({"tensor_parallel": {"autotp_size": 2, "partition_config": {
        "use_default_specs": False, "strict_mode": True, "layer_specs": [
            {"patterns": [".*\\.c_attn\\.weight$"], "partition_type": "column", "shape": [3, -1], "partition_dim": 0},
            {"patterns": [".*\\.c_proj$", ".*\\.gate$"], "partition_type": "row", "model_types": ["gpt2"]},
            {"patterns": ["lm_head"], "partition_type": "skip"}]}}})
    rules, use_default, strict = rules_from_partition_config(cfg.tensor_parallel.partition_config)
    assert (use_default, strict) == (False, True)
    assert [(r.pattern, r.kind, r.stride, r.model_types) for r in rules] == [
        (".*\\.c_attn\\.weight$", "column", 3, None), (".*\\.c_proj$", "row", 1, ("gpt2",)),
        (".*\\.gate$", "row", 1, ("gpt2",)), ("lm_head", "replicate", 1, None)]
    # a rule for another model type is not used (and so not "unmatched")
    rules[1:3] = [tp.Rule(r.pattern, r.kind, r.stride, False, ("llama",)) for r in rules[1:3]]
    with pytest.raises(ValueError) as e:
        tp.plan_autotp(hf_model("gpt2"), 2, rules, use_default_rules=False)
    assert str(e.value).splitlines()[:2] == [
        "AutoTP cannot place 6 Linear layer(s) for T=2; their names are not ones it knows:",
        "  transformer.h.0.attn.c_proj (Conv1D 32->32, in block transformer.h.0)"]
    assert "block transformer.h.0: AutoTP cuts" not in str(e.value)  # placing them first is the fix
    assert load_config({}).tensor_parallel.autotp_size == 0


@pytest.mark.parametrize("spec, message", [
    ({"patterns": ["x"], "partition_type": "row", "partition_dim": 0},
     "tensor_parallel.partition_config.layer_specs: partition_dim 0 for a row layer is not supported yet; a column "
     "layer is cut along dim 0 of its [out, in] weight, a row layer along dim 1 (remove the key)"),
    ({"patterns": ["x"], "shape": [[32, 8, 8], -1]},
     "tensor_parallel.partition_config.layer_specs: shape [[32, 8, 8], -1] is not supported yet; only [S, -1] on a "
     "column layer (its output is S equal blocks, e.g. [3, -1] for a fused q/k/v)"),
    ({"patterns": ["x"], "partition_type": "row", "gather_output": True},
     "tensor_parallel.partition_config.layer_specs: gather_output applies to column layers only, not row"),
    ({"patterns": ["("]}, None),
])
def test_layer_specs_we_cannot_honour_are_config_errors(spec, message):
    cfg = {"tensor_parallel": {"autotp_size": 2, "partition_config": {"layer_specs": [spec]}}}
    if message is None:  # a bad regex is found when the rules are made
        with pytest.raises(ConfigError, match=r"pattern '\(' is not a regular expression"):
            rules_from_partition_config(load_config(cfg).tensor_parallel.partition_config)
        return
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == message
