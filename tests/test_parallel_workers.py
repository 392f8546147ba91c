"""The persistent worker group a one-process host (ComfyUI) would hold: 2 workers on gloo keep the tiny model
between jobs, give what one process gives, stop together when the host's callback raises, and a failed job
closes the group."""

from __future__ import annotations

import pytest
import torch

from kontext_core.parallel import ParallelConfig
from kontext_core.parallel.workers import ModelSource, SamplingJob, WorkerGroup, WorkerGroupStopped
from kontext_core.sampling import SamplingOptions, sample
from tests.helpers.parallel_runs import tiny_flux_on
from tests.helpers.tiny_models import tiny_flux_model

FP32_RELATIVE = 1e-5


class Interrupted(Exception):
    pass


def job(seed: int, steps: int = 3) -> SamplingJob:
    gen = torch.Generator().manual_seed(seed)
    p = tiny_flux_model().params
    return SamplingJob(
        noise=torch.randn(1, 16, 12, 20, generator=gen),
        txt=torch.randn(1, 7, p.context_in_dim, generator=gen),
        y=torch.randn(1, p.vec_in_dim, generator=gen),
        options=SamplingOptions(steps=steps, reference_cache_every=2),
        references=[torch.randn(1, 16, 16, 8, generator=gen), torch.randn(1, 16, 10, 6, generator=gen)],
    )


def one_process(j: SamplingJob) -> torch.Tensor:
    with torch.no_grad():
        return sample(tiny_flux_on("cpu", 3), j.noise, j.txt, j.y, j.options, references=j.references)


def test_a_worker_group_serves_jobs_stops_on_request_and_closes_on_a_failure():
    group = WorkerGroup(ModelSource(tiny_flux_on, {"seed": 3}), ParallelConfig("ulysses", timeout_s=60), ["cpu"] * 2)
    try:
        pids = group.pids
        steps = []
        for seed in (1, 2):  # the same workers, the model loaded once
            out = group.sample(job(seed), callback=lambda info: steps.append(info.step))
            expected = one_process(job(seed))
            assert float((out - expected).abs().max() / expected.abs().max()) <= FP32_RELATIVE
        assert steps == [1, 2, 3] * 2 and group.pids == pids

        def interrupt(info):
            raise Interrupted(f"stop at step {info.step}")

        with pytest.raises(Interrupted, match="stop at step 1"):
            group.sample(job(1, steps=6), callback=interrupt)
        assert group.alive  # stopped together: ready for the next job
        out = group.sample(job(2))
        assert torch.allclose(out, one_process(job(2)), rtol=0, atol=FP32_RELATIVE * float(out.abs().max()))

        bad = job(1)
        bad.txt = torch.randn(1, 7, 3)  # a text width the model does not take: every worker raises
        with pytest.raises(WorkerGroupStopped, match="worker .: ValueError: txt/y: the text encoders give"):
            group.sample(bad)
        assert not group.alive
        with pytest.raises(WorkerGroupStopped, match="start a new one"):
            group.sample(job(1))
    finally:
        group.close()
    assert None not in group.exit_codes
