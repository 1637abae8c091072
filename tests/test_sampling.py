"""The one sampling loop: guidance arithmetic, batching, samplers, steps, progress, cancel, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from napari_zfdiffusion.core.diffusion import sampling
from napari_zfdiffusion.core.errors import Cancelled, UserInputError
from napari_zfdiffusion.core.progress import Progress
from napari_zfdiffusion.core.diffusion.sampling import (
    SAMPLERS,
    _coefficients,
    check_guidance,
    check_steps,
    denoise,
    generators,
    make_scheduler,
)

CPU = torch.device("cpu")
SHAPE = (2, 1, 8, 8)
# Label -> the constant a stub adds to its prediction; label 0 plays the null (unconditional) class.
OFFSETS = {0: -0.3, 1: 0.5, 2: 0.2}


class StubModel:
    """A deterministic 'network': 0.1 * x + offset[label] (+ a small term in t), recording its calls."""

    def __init__(self, offsets=OFFSETS):
        self.offsets = offsets
        self.calls: list[dict] = []

    def expected(self, x: torch.Tensor, t, label: int) -> torch.Tensor:
        return 0.1 * x + self.offsets[label] + 1e-4 * float(t)

    def __call__(self, x, t, class_labels=None, **kw):
        self.calls.append({"batch": x.shape[0], "labels": class_labels.tolist(), "x": x.clone(), "t": t})
        off = torch.tensor([self.offsets[int(c)] for c in class_labels], dtype=x.dtype).view(-1, 1, 1, 1)
        return 0.1 * x + off + 1e-4 * float(t)


class CombinedStub:
    """A single-condition stub that returns u + w (c - u) directly, to compare whole runs against."""

    def __init__(self, w: float):
        self.w = w
        self.base = StubModel()

    def __call__(self, x, t, class_labels=None, **kw):
        u = self.base.expected(x, t, 0)
        c = self.base.expected(x, t, 1)
        return u + self.w * (c - u)


def cond(label: int, n: int = SHAPE[0]) -> dict:
    return {"class_labels": torch.full((n,), label, dtype=torch.long)}


def run(model, conditions, guidance=(), *, sampler="ddim", steps=4, seed=0, shape=SHAPE, **kw):
    return denoise(model, shape, conditions=conditions, guidance=list(guidance), sampler=sampler, steps=steps,
                   gens=generators(seed, shape[0]), device=CPU, **kw)


@pytest.fixture
def recorded_preds(monkeypatch):
    """Capture the model output each scheduler step receives (the guided prediction)."""
    preds: list[torch.Tensor] = []
    real = sampling.make_scheduler

    def wrapped(name, schedule=None, **kw):
        sched = real(name, schedule, **kw)
        step = sched.step

        def recording_step(model_output, *a, **k):
            preds.append(model_output.clone())
            return step(model_output, *a, **k)

        sched.step = recording_step
        return sched

    monkeypatch.setattr(sampling, "make_scheduler", wrapped)
    return preds


# ----------------------------------------------------------------------------- guidance arithmetic
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++"])
def test_guidance_zero_is_the_unconditional_prediction(sampler):
    guided = run(StubModel(), [cond(0), cond(1)], [0.0], sampler=sampler)
    uncond_only = run(StubModel(), [cond(0)], sampler=sampler)
    cond_only = run(StubModel(), [cond(1)], sampler=sampler)
    assert torch.equal(guided, uncond_only)
    assert not torch.allclose(guided, cond_only)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++"])
def test_guidance_one_is_the_conditional_prediction(sampler):
    guided = run(StubModel(), [cond(0), cond(1)], [1.0], sampler=sampler)
    cond_only = run(StubModel(), [cond(1)], sampler=sampler)
    uncond_only = run(StubModel(), [cond(0)], sampler=sampler)
    assert torch.equal(guided, cond_only)
    assert not torch.allclose(guided, uncond_only)


@pytest.mark.parametrize("w", [0.5, 2.0, 3.0, 7.5])
def test_guidance_w_combines_u_plus_w_c_minus_u(w, recorded_preds):
    stub = StubModel()
    steps = 4
    run(stub, [cond(0), cond(1)], [w], steps=steps)
    assert len(recorded_preds) == steps and len(stub.calls) == steps
    n = SHAPE[0]
    for call, pred in zip(stub.calls, recorded_preds):
        x = call["x"][:n]
        assert torch.equal(call["x"][:n], call["x"][n:])  # both branches see the same noisy sample
        u = stub.expected(x, call["t"], 0)
        c = stub.expected(x, call["t"], 1)
        torch.testing.assert_close(pred, u + w * (c - u), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_run_equals_a_run_on_the_combined_prediction(w):
    guided = run(StubModel(), [cond(0), cond(1)], [w], steps=5)
    combined = run(CombinedStub(w), [cond(1)], steps=5)
    torch.testing.assert_close(guided, combined, rtol=1e-5, atol=1e-5)


def test_stronger_guidance_moves_further_from_unconditional():
    outs = {w: run(StubModel(), [cond(0), cond(1)], [w]) for w in (0.0, 1.0, 3.0)}
    d1 = (outs[1.0] - outs[0.0]).abs().mean()
    d3 = (outs[3.0] - outs[0.0]).abs().mean()
    assert d1 > 0 and d3 > d1


# ----------------------------------------------------------------------------- batching
def test_one_batched_forward_per_step_with_both_branches():
    stub = StubModel()
    run(stub, [cond(0), cond(1)], [3.0], steps=6)
    assert len(stub.calls) == 6
    n = SHAPE[0]
    for call in stub.calls:
        assert call["batch"] == 2 * n
        assert call["labels"] == [0] * n + [1] * n  # unconditional first, conditional second


@pytest.mark.parametrize("w, label", [(0.0, 0), (1.0, 1)])
def test_weight_zero_or_one_skips_the_unneeded_branch(w, label):
    stub = StubModel()
    run(stub, [cond(0), cond(1)], [w], steps=5)
    assert len(stub.calls) == 5
    assert all(c["batch"] == SHAPE[0] for c in stub.calls)
    assert all(c["labels"] == [label] * SHAPE[0] for c in stub.calls)


def test_conditioning_tensors_are_batched_alongside_labels():
    seen = []

    def model(x, t, class_labels=None, cond=None, noise_level=None):
        seen.append((x.shape[0], cond.shape[0], noise_level.shape[0], cond[:, 0, 0, 0].tolist()))
        return torch.zeros_like(x)

    n = SHAPE[0]
    c_u = {"class_labels": torch.zeros(n, dtype=torch.long), "cond": torch.full(SHAPE, -1.0),
           "noise_level": torch.zeros(n)}
    c_c = {"class_labels": torch.ones(n, dtype=torch.long), "cond": torch.full(SHAPE, 1.0),
           "noise_level": torch.zeros(n)}
    run(model, [c_u, c_c], [2.0], steps=2)
    assert seen == [(2 * n, 2 * n, 2 * n, [-1.0] * n + [1.0] * n)] * 2


# ----------------------------------------------------------------------------- two-condition chain
@pytest.mark.parametrize("weights, expected", [
    ((2.0, 1.5), [-1.0, 0.5, 1.5]),
    ((1.0, 1.0), [0.0, 0.0, 1.0]),
    ((3.0, 3.0), [-2.0, 0.0, 3.0]),
    ((0.0, 0.0), [1.0, 0.0, 0.0]),
    ((1.0, 2.0), [0.0, -1.0, 2.0]),
])
def test_chain_coefficients(weights, expected):
    coeffs = _coefficients(weights)
    assert coeffs == pytest.approx(expected)
    assert sum(coeffs) == pytest.approx(1.0)  # a chain of predictions stays a prediction


@pytest.mark.parametrize("w1, w2", [(2.0, 1.5), (3.0, 3.0), (1.0, 1.0), (0.5, 4.0)])
def test_two_condition_chain_prediction(w1, w2, recorded_preds):
    stub = StubModel()
    run(stub, [cond(0), cond(1), cond(2)], [w1, w2], steps=3)
    n = SHAPE[0]
    coeffs = [1 - w1, w1 - w2, w2]
    used = [i for i, a in enumerate(coeffs) if a != 0]
    for call, pred in zip(stub.calls, recorded_preds):
        assert call["batch"] == n * len(used)
        assert call["labels"] == [lab for lab in used for _ in range(n)]  # zero-weight terms skipped
        x = call["x"][:n]
        e0, e1, e2 = (stub.expected(x, call["t"], k) for k in range(3))
        torch.testing.assert_close(pred, e0 + w1 * (e1 - e0) + w2 * (e2 - e1), rtol=1e-5, atol=1e-6)
    assert len(stub.calls) == 3


def test_guidance_needs_one_weight_per_extra_condition():
    with pytest.raises(ValueError):
        run(StubModel(), [cond(0), cond(1)], [])
    with pytest.raises(ValueError):
        run(StubModel(), [cond(0), cond(1)], [1.0, 2.0])


# ----------------------------------------------------------------------------- samplers and steps
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs(sampler):
    stub = StubModel()
    out = run(stub, [cond(0), cond(1)], [2.0], sampler=sampler, steps=3)
    assert out.shape == SHAPE and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert len(stub.calls) == 3


def test_samplers_give_different_results():
    outs = [run(StubModel(), [cond(1)], sampler=s, steps=3, seed=1) for s in SAMPLERS]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j])


@pytest.mark.parametrize("name", ["euler", "", "ddim2", "k_lms"])
def test_unknown_sampler_is_refused(name):
    with pytest.raises(UserInputError, match="unknown sampler"):
        make_scheduler(name)
    stub = StubModel()
    with pytest.raises(UserInputError, match="unknown sampler"):
        run(stub, [cond(1)], sampler=name)
    assert stub.calls == []  # refused before any work


def test_sampler_names_are_case_insensitive():
    assert type(make_scheduler("DDIM")).__name__ == "DDIMScheduler"
    assert type(make_scheduler("DPMSolver++")).__name__ == "DPMSolverMultistepScheduler"


@pytest.mark.parametrize("steps", [0, -1, 1.5, "3", True, None, 1001])
def test_bad_steps_are_refused(steps):
    with pytest.raises(UserInputError, match="steps"):
        check_steps(steps)
    stub = StubModel()
    with pytest.raises(UserInputError, match="steps"):
        run(stub, [cond(1)], steps=steps)
    assert stub.calls == []


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_steps_is_the_number_of_model_calls(steps):
    stub = StubModel()
    run(stub, [cond(1)], sampler="ddim", steps=steps)
    assert len(stub.calls) == steps


@pytest.mark.parametrize("w", [-0.1, -3, math.nan, float("-inf")])
def test_bad_guidance_is_refused(w):
    with pytest.raises(UserInputError, match="guidance"):
        check_guidance(w)
    stub = StubModel()
    with pytest.raises(UserInputError):
        run(stub, [cond(0), cond(1)], [w])
    assert stub.calls == []


def test_scheduler_uses_the_models_prediction_type():
    s = make_scheduler("ddim", {"prediction_type": "v_prediction"})
    assert s.config.prediction_type == "v_prediction"
    assert make_scheduler("ddim").config.prediction_type == "epsilon"
    a = run(StubModel(), [cond(1)], schedule={"prediction_type": "v_prediction"})
    b = run(StubModel(), [cond(1)])
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_result_bitwise(sampler):
    a = run(StubModel(), [cond(0), cond(1)], [2.0], sampler=sampler, seed=11)
    b = run(StubModel(), [cond(0), cond(1)], [2.0], sampler=sampler, seed=11)
    c = run(StubModel(), [cond(0), cond(1)], [2.0], sampler=sampler, seed=12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_i_of_a_batch_equals_a_single_run_with_seed_plus_i(sampler):
    batch = run(StubModel(), [cond(0, 3), cond(1, 3)], [2.0], sampler=sampler, seed=20, shape=(3, 1, 8, 8))
    for i in range(3):
        one = run(StubModel(), [cond(0, 1), cond(1, 1)], [2.0], sampler=sampler, seed=20 + i, shape=(1, 1, 8, 8))
        torch.testing.assert_close(batch[i], one[0], rtol=0, atol=1e-5)


def test_generators_are_seed_plus_i_on_the_cpu():
    gens = generators(5, 3)
    assert [g.device.type for g in gens] == ["cpu"] * 3
    assert [g.initial_seed() for g in gens] == [5, 6, 7]


@pytest.mark.parametrize("seed", [-1, 1.5, "1"])
def test_bad_seed_is_refused(seed):
    with pytest.raises(UserInputError, match="seed"):
        generators(seed, 2)


def test_one_generator_per_sample_is_needed():
    with pytest.raises(ValueError):
        denoise(StubModel(), SHAPE, conditions=[cond(1)], gens=generators(0, 1), device=CPU, steps=2)


# ----------------------------------------------------------------------------- progress and cancel
def test_progress_is_reported_after_every_step():
    seen: list[Progress] = []
    run(StubModel(), [cond(1)], steps=4, callback=seen.append, stage="sr128", stage_index=1, n_stages=2)
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert all(p.total == 4 and p.stage == "sr128" for p in seen)
    assert [p.fraction for p in seen] == pytest.approx([0.625, 0.75, 0.875, 1.0])
    assert "sr128 4/4" in str(seen[-1])


def test_cancel_stops_within_one_step():
    stub = StubModel()

    def cancel_at_two(p: Progress) -> None:
        if p.step == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        run(stub, [cond(0), cond(1)], [2.0], steps=10, callback=cancel_at_two)
    assert len(stub.calls) == 2
