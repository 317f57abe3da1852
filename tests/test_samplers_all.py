"""Every A1111 sampler in sdlite.schedulers against its reference, and the name/schedule/infotext API.

Each loop runs our sampler and the reference side by side on the same sample, with the same fake model and
the same per-step noise, and compares timesteps, model inputs and the sample after every ``step`` call
(both stages of two-stage samplers). Error: max|ours - ref| / scale, where scale is the larger of max|ref|
after and before the call: both sides round in float32 relative to their operands, so a step that cancels
most of a large sample (the last step, when the model predicts a small x0) keeps the absolute error of the
input's size (about 1e-7 of it), which max|ref| of the small result alone would inflate. Bound: 1e-5, or
where the configuration amplifies rounding more than that, a margin over the distance of a shadow reference
whose float32 tables and model outputs are jittered by 2 ulps (``float32_noise``: what another CPU's kernels
can produce).

References: the diffusers class of each sampler (``REFERENCES``), with the stochastic ones' noise injected
(their module's ``randn_tensor`` patched; DPM++ SDE's Brownian-tree noise sampler replaced). DPM++ 2S a has
no diffusers class: it is checked against ``kdiffusion_dpmpp_2s_ancestral`` below, k-diffusion's
``sample_dpmpp_2s_ancestral`` loop written out in torch on the sigmas of diffusers' EulerDiscreteScheduler.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from float32_noise import Jitter, tolerance  # noqa: E402
from test_schedulers import CONFIGS, RTOL, SD15, SHAPE, fake_model, rel_err  # noqa: E402

from sdlite import schedulers  # noqa: E402

# diffusers applies numpy functions to torch tensors (DEIS's coefficients, Karras timesteps), which numpy 2
# flags on every call; that is the reference's business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def step_err(ours: np.ndarray, ref, ref_before) -> float:
    """max|ours - ref| relative to the larger of max|ref| and max|ref_before| (see the module docstring)."""
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    before = ref_before.numpy() if isinstance(ref_before, torch.Tensor) else np.asarray(ref_before)
    assert np.shape(ours) == ref.shape
    scale = max(float(np.max(np.abs(ref))), float(np.max(np.abs(before))), 1e-30)
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - ref))) / scale


def _dpmsolver_sde_module(monkeypatch):
    # diffusers' DPMSolverSDEScheduler imports torchsde for its Brownian tree; the tests replace that noise
    # sampler, so a stand-in module is enough to import the scheduler.
    monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    from diffusers.schedulers import scheduling_dpmsolver_sde

    return scheduling_dpmsolver_sde


# A1111 name -> (diffusers class name, from_config overrides, scheduling module holding its randn_tensor).
REFERENCES: dict[str, tuple[str, dict, str | None]] = {
    "Euler": ("EulerDiscreteScheduler", {}, None),
    "Heun": ("HeunDiscreteScheduler", {}, None),
    "LMS": ("LMSDiscreteScheduler", {}, None),
    "DPM2": ("KDPM2DiscreteScheduler", {}, None),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}, "scheduling_k_dpm_2_ancestral_discrete"),
    "DPM++ 2M": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        None,
    ),
    "DPM++ 2M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        "scheduling_dpmsolver_multistep",
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}, None),
    "DDPM": ("DDPMScheduler", {}, "scheduling_ddpm"),
    "UniPC": ("UniPCMultistepScheduler", {}, None),
    "DEIS": ("DEISMultistepScheduler", {}, None),
    "LCM": ("LCMScheduler", {}, "scheduling_lcm"),
    "TCD": ("TCDScheduler", {}, "scheduling_tcd"),
}
# The samplers tests/test_schedulers.py already checks; here only with the schedules added since.
OLD_REFERENCES: dict[str, tuple[str, dict, str | None]] = {
    "DDIM": ("DDIMScheduler", {}, None),
    "PNDM": ("PNDMScheduler", {}, None),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}, "scheduling_euler_ancestral_discrete"),
}

SCHEDULE_OVERRIDES = {
    "automatic": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}

# Stable Diffusion's scaled_linear betas exactly as diffusers (torch.linspace in float32) computes them.

# Which prediction types each sampler's reference supports beyond epsilon and v_prediction.
TAKES_SAMPLE = {"Euler", "Heun", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2S a", "DDPM", "UniPC", "DEIS", "LCM", "TCD"}
# Samplers whose reference has only timestep spacing (no use_*_sigmas), and those with their own timesteps.
SPACING_ONLY = {"DDPM", "DDIM", "PNDM", "Euler a"}
OWN_TIMESTEPS = {"LCM", "TCD"}


def reference(name: str, config: dict, schedule: str, monkeypatch):
    """The diffusers scheduler for an A1111 name and schedule."""
    cls_name, overrides, _ = {**REFERENCES, **OLD_REFERENCES}[name]
    if name == "DPM++ SDE":
        cls = _dpmsolver_sde_module(monkeypatch).DPMSolverSDEScheduler
    else:
        cls = getattr(diffusers, cls_name)
    return cls.from_config({**config, **overrides, **SCHEDULE_OVERRIDES[schedule]})


class NoiseFeed:
    """The noise of the current step call, handed to the reference wherever it draws noise."""

    def __init__(self) -> None:
        self.current: np.ndarray | None = None

    def randn(self, *args, **kwargs):
        assert self.current is not None
        return torch.from_numpy(self.current.copy())


def patch_reference_noise(name: str, ref, feed: NoiseFeed, monkeypatch) -> None:
    """Make the reference take its noise from ``feed`` (after set_timesteps, which resets DPM++ SDE's)."""
    module = {**REFERENCES, **OLD_REFERENCES}[name][2]
    if module is not None:
        monkeypatch.setattr(getattr(diffusers.schedulers, module), "randn_tensor", feed.randn)
    if name == "DPM++ SDE":
        ref.noise_sampler = lambda sigma, sigma_next: feed.randn()


def run_side_by_side(name: str, config: dict, steps: int, monkeypatch, schedule: str = "automatic") -> float:
    """Run ours and the diffusers reference for `steps` steps; assert they agree after every call, within
    the rounding sensitivity a jittered shadow of the reference shows (see the module docstring)."""
    ours = schedulers.create(name, config, schedule=schedule)
    ref = reference(name, config, schedule, monkeypatch)
    shadow = reference(name, config, schedule, monkeypatch)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    shadow.set_timesteps(steps)
    jitter = Jitter()
    jitter.tables(shadow)
    feed = NoiseFeed()
    patch_reference_noise(name, ref, feed, monkeypatch)
    patch_reference_noise(name, shadow, feed, monkeypatch)

    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.shape == ref_t.shape
    np.testing.assert_allclose(ours.timesteps, ref_t, rtol=1e-6, atol=1e-4)
    assert ours.timesteps.dtype.kind == ref_t.dtype.kind
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    gen = np.random.default_rng(0)
    x0 = gen.standard_normal(SHAPE).astype(np.float32) * np.float32(ours.init_noise_sigma)
    x, x_ref, x_shadow = x0.copy(), torch.from_numpy(x0.copy()), torch.from_numpy(x0.copy())
    worst = floor = 0.0
    for i, (t, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps, strict=True)):
        feed.current = gen.standard_normal(SHAPE).astype(np.float32)
        x_in = ours.scale_model_input(x, t)
        x_in_ref = ref.scale_model_input(x_ref, t_ref)
        worst = max(worst, rel_err(x_in, x_in_ref))
        eps = fake_model(x_in, t)
        eps_ref = torch.from_numpy(fake_model(x_in_ref.numpy(), t_ref.item()))
        eps_shadow = fake_model(shadow.scale_model_input(x_shadow, t_ref).numpy(), t_ref.item())
        x = ours.step(eps, t, x, noise=feed.current if ours.stochastic else None)
        x_before, x_ref = x_ref, ref.step(eps_ref, t_ref, x_ref).prev_sample
        x_shadow = jitter.tensor(shadow.step(torch.from_numpy(jitter.array(eps_shadow)), t_ref, x_shadow).prev_sample)
        assert x.dtype == np.float32
        floor = max(floor, step_err(x_shadow.numpy(), x_ref, x_before))
        err = step_err(x, x_ref, x_before)
        bound = tolerance(floor, RTOL)
        assert err < bound, f"{name} step {i} (t={t}): relative error {err:.2e}, bound {bound:.2e}"
        worst = max(worst, err)
    return worst


DIFFUSERS_SAMPLERS = list(REFERENCES)


@pytest.mark.parametrize("steps", [1, 5, 16])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_matches_diffusers(name, prediction_type, config_name, steps, monkeypatch):
    if prediction_type == "sample" and name not in TAKES_SAMPLE:
        pytest.skip(f"diffusers' {REFERENCES[name][0]} does not take prediction_type='sample'")
    config = {**CONFIGS[config_name], "prediction_type": prediction_type}
    run_side_by_side(name, config, steps, monkeypatch)


SCHEDULES_BY_SAMPLER = [
    (name, schedule)
    for name in [*DIFFUSERS_SAMPLERS, *OLD_REFERENCES]
    if name not in OWN_TIMESTEPS
    for schedule in (("sgm_uniform",) if name in SPACING_ONLY else ("karras", "exponential", "beta", "sgm_uniform"))
]


@pytest.mark.parametrize("steps", [1, 6, 16])
@pytest.mark.parametrize("name, schedule", SCHEDULES_BY_SAMPLER)
def test_schedules_match_diffusers(name, schedule, steps, monkeypatch):
    run_side_by_side(name, SD15, steps, monkeypatch, schedule=schedule)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("Euler", None),
        ("Euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
        ("Euler", {"final_sigmas_type": "sigma_min"}),
        ("Euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
        ("Euler", {"beta_schedule": "squaredcos_cap_v2"}),
        ("Heun", None),
        ("Heun", {"clip_sample": True, "clip_sample_range": 0.5}),
        ("LMS", None),
        ("DPM2", None),
        ("DPM2 a", None),
        ("DPM++ SDE", None),
        ("DPM++ 2M", {"use_exponential_sigmas": True, "solver_type": "heun"}),
        ("DPM++ 2M", {"lambda_min_clipped": -5.1}),
        ("DPM++ 2M SDE", None),
        ("DPM++ 2M SDE", {"solver_type": "heun", "use_karras_sigmas": True}),
        ("DPM++ 2M SDE", {"final_sigmas_type": "sigma_min"}),
        ("DPM++ 2M SDE", {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}),
        ("DDPM", None),
        ("DDPM", {"variance_type": "fixed_large", "clip_sample": True, "clip_sample_range": 0.5}),
        ("DDPM", {"variance_type": "fixed_small_log", "rescale_betas_zero_snr": True}),
        ("UniPC", None),
        # bh1 with a final sigma of 0 gives NaN in the reference (-inf * 0); see test_unipc_bh1_last_step.
        ("UniPC", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
        ("UniPC", {"solver_order": 3}),
        ("UniPC", {"solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
        ("UniPC", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
        ("UniPC", {"disable_corrector": [0, 2]}),
        ("UniPC", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
        ("DEIS", None),
        # Third-order DEIS amplifies any rounding in the training table; sdlite's betas are torch's bit for bit.
        ("DEIS", {"solver_order": 3}),
        ("DEIS", {"solver_order": 3, "use_karras_sigmas": True}),
        ("DEIS", {"solver_order": 1}),
        ("LCM", None),
        ("LCM", {"original_inference_steps": 25, "timestep_scaling": 5.0, "set_alpha_to_one": False}),
        ("LCM", {"clip_sample": True}),
        ("TCD", None),
    ],
)
@pytest.mark.parametrize("steps", [4, 20])
def test_matches_diffusers_other_configs(name, overrides, steps, monkeypatch):
    config = {} if overrides is None else {**SD15, **overrides}
    run_side_by_side(name, config, steps, monkeypatch)


# --- DPM++ 2S a against k-diffusion's loop -------------------------------------------------------------------


def kdiffusion_dpmpp_2s_ancestral(denoise, x, sigmas, noises):
    """k-diffusion's ``sample_dpmpp_2s_ancestral`` (eta = 1, s_noise = 1) in torch, returning every state.

    ``denoise(x, sigma)`` is the k-diffusion model; ``noises[i]`` the noise step i adds. The returned list
    holds, per step, the midpoint sample x_2 (when the step has one) and then the new x: the states sdlite's
    scheduler returns from its ``step`` calls.
    """
    states = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            t, t_next = -sigma.log(), -sigma_down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h / 2).expm1() * denoised
            states.append(x_2)
            denoised_2 = denoise(x_2, (-s).exp())
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + noises[i] * sigma_up
        states.append(x)
    return states


@pytest.mark.parametrize("steps", [1, 5, 16])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_dpmpp_2s_ancestral_matches_kdiffusion(prediction_type, config_name, steps):
    config = {**CONFIGS[config_name], "prediction_type": prediction_type}
    check_dpmpp_2s_ancestral(config, steps, "automatic")


@pytest.mark.parametrize("schedule", ["karras", "exponential", "beta", "sgm_uniform"])
def test_dpmpp_2s_ancestral_schedules(schedule):
    check_dpmpp_2s_ancestral(SD15, 8, schedule)


def check_dpmpp_2s_ancestral(config: dict, steps: int, schedule: str) -> float:
    ours = schedulers.create("DPM++ 2S a", config, schedule=schedule)
    ours.set_timesteps(steps)
    # The k-diffusion loop runs on the noise levels diffusers' Euler scheduler picks for this config.
    euler = diffusers.EulerDiscreteScheduler.from_config({**config, **SCHEDULE_OVERRIDES[schedule]})
    euler.set_timesteps(steps)
    log_sigmas = np.log(((1 - euler.alphas_cumprod) / euler.alphas_cumprod).numpy() ** 0.5)
    prediction_type = config["prediction_type"]

    def denoise(x, sigma):
        # The fake U-Net as a k-diffusion denoiser: VP input, timestep from sigma, output to x0.
        t = float(euler._sigma_to_t(np.array(float(sigma)), log_sigmas))
        scale = (sigma**2 + 1) ** 0.5
        out = torch.from_numpy(fake_model((x / scale).numpy(), t))
        if prediction_type == "epsilon":
            return x - sigma * out
        if prediction_type == "v_prediction":
            return out * (-sigma / scale) + x / (sigma**2 + 1)
        return out

    gen = np.random.default_rng(0)
    x0 = gen.standard_normal(SHAPE).astype(np.float32) * np.float32(ours.init_noise_sigma)
    noises = [gen.standard_normal(SHAPE).astype(np.float32) for _ in ours.timesteps]
    assert ours.init_noise_sigma == pytest.approx(float(euler.init_noise_sigma), rel=1e-6)
    np.testing.assert_allclose(ours.timesteps[0::2], euler.timesteps.numpy(), rtol=1e-6)
    # Step i's noise is the one our scheduler gets on its second call of that step (its last, for the last step).
    step_noise = [torch.from_numpy(noises[min(2 * i + 1, len(noises) - 1)]) for i in range(steps)]
    want = kdiffusion_dpmpp_2s_ancestral(denoise, torch.from_numpy(x0.copy()), euler.sigmas, step_noise)

    x, worst = x0.copy(), 0.0
    assert len(want) == len(ours.timesteps)
    for i, t in enumerate(ours.timesteps):
        x_in = ours.scale_model_input(x, t)
        x = ours.step(fake_model(x_in, t), t, x, noise=noises[i])
        err = step_err(x, want[i], want[i - 1] if i else x0)
        assert err < RTOL, f"DPM++ 2S a call {i} (t={t}): relative error {err:.2e}"
        worst = max(worst, err)
    return worst


def test_deis_third_order_sd_betas(monkeypatch):
    # Third-order DEIS amplifies 1-ulp differences in the betas, so sdlite's betas equal torch's float32
    # linspace bit for bit; the steps then agree within the rounding sensitivity of the trajectory.
    config = {**SD15, "solver_order": 3}
    ours, ref = schedulers.create("DEIS", config), diffusers.DEISMultistepScheduler.from_config(config)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    run_side_by_side("DEIS", config, 20, monkeypatch)


def test_unipc_noise_prediction_last_step_to_zero():
    # With noise prediction the reference's last step to sigma = 0 computes 0 * inf (NaN); sdlite takes the
    # limit, the data prediction from the corrected sample.
    sched = schedulers.create("UniPC", {**SD15, "predict_x0": False})
    sched.set_timesteps(4)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for t in sched.timesteps:
        x = sched.step(fake_model(x, t), t, x)
    assert np.isfinite(x).all()


def test_unipc_bh1_last_step_to_zero():
    # The reference's last bh1 step to sigma = 0 computes B(h) * 0 with B(h) = -inf and returns NaN; the
    # limit h -> inf is the data prediction, which sdlite returns.
    sched = schedulers.create("UniPC", {**SD15, "solver_type": "bh1"})
    sched.set_timesteps(4)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for t in sched.timesteps:
        eps = fake_model(x, t)
        alpha_bar = float(sched.alphas_cumprod[t])
        x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
        x = sched.step(eps, t, x)
    assert np.isfinite(x).all()
    assert rel_err(x, x0) < RTOL


@pytest.mark.parametrize("name", [*DIFFUSERS_SAMPLERS])
def test_add_noise_matches_diffusers(name, monkeypatch):
    ours, ref = schedulers.create(name, SD15), reference(name, SD15, "automatic", monkeypatch)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    gen = np.random.default_rng(1)
    original = gen.standard_normal(SHAPE).astype(np.float32)
    noise = gen.standard_normal(SHAPE).astype(np.float32)
    for pair in ([0, 0], [2, 4], [6, 1]):
        t = ours.timesteps[pair]
        got = ours.add_noise(original, noise, t)
        want = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), ref.timesteps[pair])
        assert got.dtype == np.float32
        assert rel_err(got, want) < RTOL


# --- names, schedules, infotext --------------------------------------------------------------------------

A1111_NAMES = [
    "Euler",
    "Euler a",
    "Heun",
    "LMS",
    "LMS Karras",
    "DPM2",
    "DPM2 a",
    "DPM2 Karras",
    "DPM2 a Karras",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "DPM++ SDE",
    "DPM++ SDE Karras",
    "DPM++ 2S a",
    "DDIM",
    "PNDM",
    "DDPM",
    "UniPC",
    "DEIS",
    "LCM",
    "TCD",
]


def test_names_are_all_a1111_names():
    assert schedulers.names() == sorted(A1111_NAMES)


def test_schedules():
    assert schedulers.schedules() == ["automatic", "karras", "exponential", "beta", "sgm_uniform"]
    assert schedulers.canonical_schedule(None) == "automatic"
    assert schedulers.canonical_schedule("SGM Uniform") == "sgm_uniform"
    assert schedulers.canonical_schedule("trailing") == "sgm_uniform"
    assert schedulers.canonical_schedule(" KARRAS ") == "karras"


@pytest.mark.parametrize("combined", ["LMS Karras", "DPM2 Karras", "DPM2 a Karras", "DPM++ 2M Karras",
                                      "DPM++ 2M SDE Karras", "DPM++ SDE Karras"])  # fmt: skip
def test_combined_name_equals_schedule_argument(combined):
    base = combined.removesuffix(" Karras")
    a, b = schedulers.create(combined, SD15), schedulers.create(base, SD15, schedule="karras")
    c = schedulers.create(base.lower().replace(" ", "_"), SD15, schedule="Karras")
    for sched in (a, b, c):
        sched.set_timesteps(12)
    np.testing.assert_array_equal(a.timesteps, b.timesteps)
    np.testing.assert_array_equal(a.sigmas, b.sigmas)
    np.testing.assert_array_equal(a.timesteps, c.timesteps)
    plain = schedulers.create(base, SD15)
    plain.set_timesteps(12)
    assert not np.array_equal(plain.sigmas, a.sigmas)
    # The combined name with its own schedule named again is fine.
    schedulers.create(combined, SD15, schedule="karras")


@pytest.mark.parametrize(
    "name, schedule, fields",
    [
        ("DPM++ 2M", "karras", {"Sampler": "DPM++ 2M Karras", "Schedule type": "Karras"}),
        ("dpm++ 2m karras", None, {"Sampler": "DPM++ 2M Karras", "Schedule type": "Karras"}),
        ("DPM++ 2M", None, {"Sampler": "DPM++ 2M", "Schedule type": "Uniform"}),
        ("Euler", "karras", {"Sampler": "Euler", "Schedule type": "Karras"}),
        ("DPM++ SDE", "exponential", {"Sampler": "DPM++ SDE", "Schedule type": "Exponential"}),
        ("UniPC", "sgm_uniform", {"Sampler": "UniPC", "Schedule type": "SGM Uniform"}),
        ("DPM2 a", "beta", {"Sampler": "DPM2 a", "Schedule type": "Beta"}),
        ("LCM", "automatic", {"Sampler": "LCM", "Schedule type": "Uniform"}),
    ],
)
def test_infotext_fields_round_trip(name, schedule, fields):
    assert schedulers.infotext_fields(name, schedule) == fields
    want = (schedulers.canonical_name(name), schedulers.canonical_schedule(schedule))
    if want[0].endswith(" Karras"):
        want = (want[0].removesuffix(" Karras"), "karras")
    assert schedulers.parse_infotext(fields) == want


def test_parse_infotext_old_and_new_forms():
    assert schedulers.parse_infotext({"Sampler": "DPM++ 2M Karras"}) == ("DPM++ 2M", "karras")
    assert schedulers.parse_infotext({"Sampler": "DPM++ 2M", "Schedule type": "Karras"}) == ("DPM++ 2M", "karras")
    assert schedulers.parse_infotext({"Sampler": "Euler a", "Schedule type": "Automatic"}) == ("Euler a", "automatic")


@pytest.mark.parametrize("schedule", ["karras", "exponential", "beta"])
def test_euler_ancestral_walks_the_sigma_schedules_euler_does(schedule):
    """diffusers' Euler a has no sigma schedules; sdlite's walks the ones its Euler does (tested against diffusers
    above), as A1111's "Euler a" with a schedule type does."""
    ancestral = schedulers.create("Euler a", SD15, schedule=schedule)
    euler = schedulers.create("Euler", SD15, schedule=schedule)
    ancestral.set_timesteps(12)
    euler.set_timesteps(12)
    np.testing.assert_array_equal(ancestral.sigmas, euler.sigmas)
    np.testing.assert_array_equal(ancestral.timesteps, euler.timesteps)


@pytest.mark.parametrize(
    "name, schedule, message",
    [
        ("DDIM", "karras", "sampler 'DDIM' cannot use schedule 'karras'; it takes: automatic, sgm_uniform"),
        ("LCM", "sgm_uniform", "sampler 'LCM' cannot use schedule 'sgm_uniform'; it takes: automatic"),
        ("PNDM", "exponential",
         "sampler 'PNDM' cannot use schedule 'exponential'; it takes: automatic, sgm_uniform"),
        ("DPM++ 2M Karras", "exponential",
         "sampler 'DPM++ 2M Karras' already names the Karras schedule; use 'DPM++ 2M' with schedule 'exponential'"),
        ("Euler", "polyexponential", "unknown schedule 'polyexponential'; known schedules: automatic, karras, "
         "exponential, beta, sgm_uniform"),
    ],
)  # fmt: skip
def test_invalid_combinations(name, schedule, message):
    with pytest.raises(ValueError) as info:
        schedulers.create(name, SD15, schedule=schedule)
    assert str(info.value) == message
    with pytest.raises(ValueError):
        schedulers.infotext_fields(name, schedule)


@pytest.mark.parametrize("name", A1111_NAMES)
@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_every_sampler_rejects_bad_steps(name, steps):
    sched = schedulers.create(name, SD15)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sched.set_timesteps(steps)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("LCM", {}, r"LCM: steps must be <= original_inference_steps \(50\), got 51"),
        ("DDPM", {"num_train_timesteps": 40}, r"DDPM: steps must be <= num_train_timesteps \(40\), got 51"),
    ],
)
def test_too_many_steps(name, overrides, message):
    sched = schedulers.create(name, {**SD15, **overrides})
    with pytest.raises(ValueError, match=message):
        sched.set_timesteps(51)


def test_conflicting_sigma_flags_in_config():
    with pytest.raises(ValueError, match="only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas"):
        schedulers.create("Euler", {**SD15, "use_karras_sigmas": True, "use_beta_sigmas": True})


def test_lcm_runs_on_a_plain_sd_config():
    # LCM on a model not distilled for it is allowed (the images are poor, the sampler is the same).
    sched = schedulers.create("LCM", SD15)
    sched.set_timesteps(4)
    np.testing.assert_array_equal(sched.timesteps, [999, 759, 499, 259])
    gen = np.random.default_rng(0)
    x = gen.standard_normal(SHAPE).astype(np.float32)
    for t in sched.timesteps:
        x = sched.step(fake_model(x, t), t, x, noise=gen.standard_normal(SHAPE).astype(np.float32))
    assert np.isfinite(x).all()


@pytest.mark.parametrize("name", sorted({*A1111_NAMES} - {"DDIM", "PNDM", "Euler", "Heun", "LMS", "DPM2", "DPM++ 2M",
                                                          "UniPC", "DEIS", "LMS Karras", "DPM2 Karras",
                                                          "DPM++ 2M Karras"}))  # fmt: skip
def test_stochastic_samplers_need_noise(name):
    sched = schedulers.create(name, SD15)
    assert sched.stochastic
    sched.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    # Two-stage samplers use noise on a step's second call; call until one needs it.
    with pytest.raises(ValueError, match="needs noise"):
        for t in sched.timesteps:
            x = sched.step(fake_model(x, t), t, x)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps", [1000, 999, 17, 2])
def test_training_betas_equal_torch_bit_for_bit(schedule, steps):
    """Multistep samplers amplify 1-ulp differences in the betas, so they must be torch's exactly."""
    from sdlite.schedulers.sigmas import betas_from_config

    start, end = 0.00085, 0.012
    if schedule == "linear":
        want = torch.linspace(start, end, steps, dtype=torch.float32)
    else:
        want = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
    got = betas_from_config(steps, start, end, schedule)
    assert np.array_equal(got, want.numpy())
