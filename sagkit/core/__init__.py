"""The mathematics of diffusion sampling: schedules, the model protocol and models, the
probability-flow ODE and its solvers, the frames (ρ, τ, Tweedie), clean-image estimates, the
SDE sampler and DDIM inversion. Nothing here knows about gradients engines or guidance."""
