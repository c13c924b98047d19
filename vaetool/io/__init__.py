"""File I/O for the commands: atomic writes, images, latent files, shards, input lists, manifests."""
