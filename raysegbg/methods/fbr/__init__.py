"""`fbr`: weakly supervised segmentation from image-level labels with a fine-grained background
representation, in its parts: `params` (settings, light to import), `contrast` (CAM pseudo-
labels, batched k-means, prototypes and the two contrastive losses) and `method` (the stages)."""
