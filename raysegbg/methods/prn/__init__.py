"""`prn`: PatchRefineNet, in its parts: `params` (settings, light to import), `labels` (the
patch-threshold pseudo-labels and their store), `refiner` (the refiner network and its losses)
and `method` (the stages and the steps that tie them together)."""
