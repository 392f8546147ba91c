"""The persistent worker group a one-process host (ComfyUI) holds: 2 workers on gloo keep the tiny model between
jobs, give what one process gives (with a LoRA too), stop together when the host's callback raises, skip a job
whose LoRA cannot load, and a failed job closes the group."""

from __future__ import annotations

import pytest
import torch

from kontext_core.parallel import ParallelConfig
from kontext_core.parallel.workers import LoraFile, ModelSource, SamplingJob, WorkerGroup, WorkerGroupStopped
from kontext_core.runtime.lora import apply_lora
from kontext_core.sampling import SamplingOptions, sample
from tests.helpers.parallel_runs import tiny_flux_on
from tests.helpers.tiny_files import write_lora
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


def one_process(j: SamplingJob, lora: LoraFile | None = None) -> torch.Tensor:
    model = tiny_flux_on("cpu", 3)
    if lora is not None:
        apply_lora(model, lora.path, lora.strength)
    with torch.no_grad():
        return sample(model, j.noise, j.txt, j.y, j.options, references=j.references)


def relative(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out - expected).abs().max() / expected.abs().max())


def test_a_worker_group_serves_jobs_stops_on_request_and_closes_on_a_failure(tmp_path):
    group = WorkerGroup(ModelSource(tiny_flux_on, {"seed": 3}), ParallelConfig("ulysses", timeout_s=60), ["cpu"] * 2)
    try:
        pids = group.pids
        steps = []
        for seed in (1, 2):  # the same workers, the model loaded once
            out = group.sample(job(seed), callback=lambda info: steps.append(info.step))
            assert relative(out, one_process(job(seed))) <= FP32_RELATIVE
        assert steps == [1, 2, 3] * 2 and group.pids == pids

        def interrupt(info):
            raise Interrupted(f"stop at step {info.step}")

        with pytest.raises(Interrupted, match="stop at step 1"):
            group.sample(job(1, steps=6), callback=interrupt)
        assert group.alive  # stopped together: ready for the next job
        assert relative(group.sample(job(2)), one_process(job(2))) <= FP32_RELATIVE

        write_lora(tmp_path / "lora.safetensors")
        lora = LoraFile.of(str(tmp_path / "lora.safetensors"), 0.8)
        with_lora = job(3)
        with_lora.loras = (lora,)
        assert relative(group.sample(with_lora), one_process(job(3), lora)) <= FP32_RELATIVE
        assert relative(group.sample(job(3)), one_process(job(3))) <= FP32_RELATIVE  # and off again
        missing = job(3)
        missing.loras = (LoraFile(str(tmp_path / "missing.safetensors"), 1.0, (0, 0)),)
        with pytest.raises(ValueError, match="LoRA: .*missing.safetensors"):
            group.sample(missing)
        assert group.alive  # every worker skipped that job: the group goes on

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
