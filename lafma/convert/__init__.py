"""Published checkpoints (released LAFMA, AudioLDM's HiFi-GAN, diffusers AudioLDM) → this
project's modules: each converter reads a file's layout, infers the architecture from its
tensor shapes, and returns a state dict that loads strictly into the module it describes."""
