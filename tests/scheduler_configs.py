"""Scheduler configs the sampler tests share (no torch needed)."""

# Stable Diffusion 1.5's scheduler_config.json.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
