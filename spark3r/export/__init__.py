"""Writers of a reconstruction's results in formats other tools read: PLY point clouds, COLMAP text models, per-frame
depth maps and a preview image. Plain arrays in, files out; nothing here runs a model."""
