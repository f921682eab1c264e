from robuq.diffusion.gaussian import GaussianDiffusion, create_diffusion, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion", "space_timesteps"]
