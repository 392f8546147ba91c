"""One forward and one sampling run split across 2 and 4 processes (gloo on this CPU) equal the same model in
one process: Ulysses, ring, CFG parallel, with two references, all three reference methods, partial denoise,
the reference cache, LoRA and fp8 layers. The processes are started here and bounded in time."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.parallel import Tokens, sent_per_forward
from kontext_core.parallel import ParallelConfig, init_from_environment
from kontext_core.parallel.attention import check_heads
from kontext_core.parallel.errors import NOT_LAUNCHED
from kontext_core.parallel.layout import ShardLayout
from tests.helpers.parallel_runs import run_group, torchrun
from tests.helpers.parallel_worker import INJECTED
from tests.helpers.tiny_models import TINY_FLUX

# fp32 rounding: attention sums in another order (Ulysses: keys in rank order; ring: merged log-sum-exps)
FP32_RELATIVE = 1e-5
WORKER = ["-m", "tests.helpers.parallel_worker", "checks"]
TIMEOUT_S = 60  # the group's timeout: a rank that lost its peer must give up before it, startup included


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}-ranks")
def group_reports(request, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp(f"parallel{request.param}")
    done = run_group(request.param, [*WORKER, str(out)], timeout=120)
    assert done.returncodes == [0] * request.param, done.output
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(request.param)]


def test_split_runs_equal_one_process(group_reports):
    errors = group_reports[0]["errors"]
    cfg = {"cfg_sample"} if len(group_reports) == 2 else {"cfg+ulysses_sample", "cfg+ring_sample"}
    expected = {"ring_three_heads_forward", "ulysses_lora_fp8_forward", *cfg}
    for method in ("ulysses", "ring"):
        expected |= {f"{method}_{check}" for check in ("forward", "cache_record", "cache_reuse")}
        for reference_method in ("offset", "index", "uxo"):
            expected |= {f"{method}_sample_{reference_method}{run}" for run in ("", "_cache", "_denoise")}
    assert set(errors) == expected
    too_far = {name: error for name, error in errors.items() if not error <= FP32_RELATIVE}
    assert not too_far, f"beyond fp32 rounding ({FP32_RELATIVE}): {too_far}"
    assert all(report["errors"] == errors for report in group_reports), "every rank gathers the same result"


def test_callback_runs_on_rank_zero_and_its_stop_stops_every_rank(group_reports):
    assert group_reports[0]["callback_steps"] == [1, 2, 3]
    assert all(report["callback_steps"] == [] for report in group_reports[1:])
    assert [report["stop"] for report in group_reports] == ["Interrupted"] + ["StopRequested"] * (
        len(group_reports) - 1
    )


def test_ulysses_refuses_heads_the_ranks_do_not_divide(group_reports):
    message = group_reports[0]["ulysses_three_heads"]
    assert "3 attention heads" in message and f"{len(group_reports)} ranks" in message and "ring" in message


def test_the_benchmark_counts_the_bytes_the_ranks_send(group_reports):
    tokens = Tokens(text=7, target=60, references=47)  # the worker's edit: 6×10 target, 8×4 + 5×3 references
    ranks = len(group_reports)
    for method in ("ulysses", "ring"):
        computed = sum(sent_per_forward(TINY_FLUX, tokens, ranks, method, itemsize=4, batch=2).values())
        assert [report["bytes_sent"][method] for report in group_reports] == [computed] * ranks


def test_refusals_before_any_process_group():
    with pytest.raises(ValueError, match="2 processes"):
        ParallelConfig("cfg").sequence_degree(4)
    with pytest.raises(ValueError, match="even number"):
        ParallelConfig("cfg+ring").sequence_degree(3)
    with pytest.raises(ValueError, match="at least 2"):
        ParallelConfig("ulysses").sequence_degree(1)
    with pytest.raises(ValueError, match="must be one of"):
        ParallelConfig("tensor")
    with pytest.raises(ValueError, match="divides 24"):
        check_heads(24, 5)
    check_heads(24, 8)


def test_without_torchrun_the_split_is_refused_naming_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError) as refused:
        init_from_environment(ParallelConfig("ulysses"))
    assert str(refused.value) == NOT_LAUNCHED and "torchrun --nproc-per-node" in NOT_LAUNCHED


def test_layout_pads_each_segment_and_gathers_back():
    layout = ShardLayout([7, 60, 47], ranks=4)
    x = torch.arange(114.0)[None, :, None]
    shards = [layout.shard(x, r) for r in range(4)]
    assert {s.shape[1] for s in shards} == {2 + 15 + 12}
    assert torch.equal(layout.gather(shards), x)
    assert int(sum(layout.valid(r).sum() for r in range(4))) == 114


def test_a_rank_that_raises_stops_every_rank_with_its_error_printed_once():
    done = torchrun(2, ["-m", "tests.helpers.parallel_worker", "fail", str(TIMEOUT_S)], timeout=3 * TIMEOUT_S)
    assert done.returncodes != [0]
    assert done.output.count(INJECTED) == 1, done.output
    assert "PeerFailed: rank 0: the all-to-all of attention failed" in done.output
    assert done.seconds < TIMEOUT_S, "rank 0 learnt of the failure from the lost connection, not the timeout"
