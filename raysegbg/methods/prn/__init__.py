"""`prn`: PatchRefineNet, in its parts: `params` (settings), `labels` (the patch-threshold
pseudo-labels and their store), `refiner` (the refiner network and its losses) and `method`
(the stages and the steps that tie them together)."""

from raysegbg.data.loader import in_holdout
from raysegbg.methods.prn.labels import head_name, label_key
from raysegbg.methods.prn.method import Prn, PrnStage
from raysegbg.methods.prn.params import PrnParams

__all__ = ["Prn", "PrnParams", "PrnStage", "head_name", "in_holdout", "label_key"]
