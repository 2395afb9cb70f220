"""`rrn`: semi-supervised segmentation with region relevance, in its parts: `params` (settings,
light to import), `regions` (the region discriminator, its targets, the keep / weight maps and
CutMix) and `method` (the two networks' step and the end-of-epoch labelling)."""
