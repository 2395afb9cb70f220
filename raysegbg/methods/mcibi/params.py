"""`mcibi`'s settings (`method.mcibi.*`): no torch here, so a config loads fast."""

from __future__ import annotations

from dataclasses import dataclass

from raysegbg.config import check, check_choice, param


@dataclass(frozen=True)
class McibiParams:
    """Mining Contextual Information Beyond Image: a dataset-level class memory."""

    dims: int = param(64, "memory / pixel feature size")
    attention_dims: int = param(32, "query/key size of the attention over what a pixel read")
    feature_stride: int = param(
        0, "work at 1/stride of the image (labels downsampled); 0: the finest power of two "
        "leaving <= 32 x 32 positions on a training crop (the memory read attends over all)",
    )  # fmt: skip
    momentum: float = param(0.9, "update rate of an entry toward the batch's class mean")
    momentum_follows_lr: bool = param(True, "momentum x lr/lr0, as in the reference")
    aggregation: str = param("soft", "soft | hard: how a pixel reads the memory")
    update: bool = param(True, "false: memory frozen at its random initial value (ablation)")
    stage1_weight: float = param(0.4, "loss weight of the stage-1 (pre-memory) classifier")
    stage2_weight: float = param(1.0, "loss weight of the stage-2 (memory-fused) classifier")
    consistency_weight: float = param(
        1.0, "loss weight: stage 2 classifies each entry as its class"
    )

    def __post_init__(self) -> None:
        check_choice("method.mcibi.aggregation", self.aggregation, ("soft", "hard"))
        check(
            self.feature_stride >= 0,
            "method.mcibi.feature_stride must be >= 0 (0 picks one from data.crop_size)",
        )
        check(
            self.dims >= 1 and self.attention_dims >= 1,
            "method.mcibi.dims and attention_dims must be >= 1",
        )
        check(0 <= self.momentum <= 1, "method.mcibi.momentum must be in [0, 1], e.g. 0.9")
