"""vaetool: images to latents and latents to images with the Stable Diffusion family of VAEs."""

__version__ = "0.1.0"
