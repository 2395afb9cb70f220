"""fbr's pieces, plain tensor functions: CAMs and their pseudo-labels, seeded pixel sampling,
the batched per-image k-means that makes NROIs, class prototypes, and the two contrastive
losses (pixel-to-NROI, intra-foreground with active negative sampling).

Features are L2-normalised along dim 1 (channels) of (B, D, H, W) maps, or the last dim of
(N, D) rows. Every sample is drawn from a CPU generator the caller seeds from (seed, step,
rank), so a resumed run draws what an uninterrupted one does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysegbg import dist

EPS = 1e-5
BG_CAM = 0.05  # the background head's target: pixels where the normalised CAMs sum below this


def normalized_cams(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) class activation maps of the K foreground classes in [0, 1]: ReLU of the
    classifier's score maps, divided by each map's peak, zero for classes not in `present`
    (B, K) (the image-level labels, or the classifier's own prediction at inference)."""
    cams = F.relu(scores.float()) * present[:, :, None, None].float()
    peak = cams.flatten(2).amax(2).clamp_min(EPS)
    return cams / peak[:, :, None, None]


def cam_labels(cams: torch.Tensor, bg: float) -> torch.Tensor:
    """(B, H, W) pseudo-labels: the class (1..K) with the highest CAM, or background (0)
    where no class reaches `bg`."""
    return torch.cat([torch.full_like(cams[:, :1], bg), cams], 1).argmax(1)


def cam_logits(cams: torch.Tensor, bg: float) -> torch.Tensor:
    """(B, 1 + K, H, W) scores whose argmax is `cam_labels` (for evaluation and inference)."""
    return torch.cat([torch.full_like(cams[:, :1], bg), cams], 1)


def sample(mask: torch.Tensor, count: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Up to `count` distinct random positions per row of the (B, N) boolean `mask`: (indices
    (B, m), valid (B, m)), m = min(count, N); `valid` is False where a row had fewer."""
    scores = torch.rand(mask.shape, generator=gen).to(mask.device)
    scores = torch.where(mask, scores, torch.full_like(scores, -1.0))
    top = scores.topk(min(count, mask.shape[1]), dim=1)
    return top.indices, top.values >= 0


def pixel_rows(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, m, D): the features of (B, D, H, W) `z` at the flat pixel positions `index` (B, m)."""
    return z.flatten(2).transpose(1, 2).gather(1, index[..., None].expand(-1, -1, z.shape[1]))


def rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`table[index]` for a 1-D `index` that repeats rows, with a run-to-run identical
    gradient: plain indexing's backward adds the repeats in a thread-dependent order on CPU."""
    return table.index_select(0, index)


def kmeans(x: torch.Tensor, valid: torch.Tensor, k: int, iters: int):
    """Spherical k-means of every image's points at once: x (B, N, D) normalised, valid (B, N).

    Initial centres are the first k valid points (the points come in random order); Lloyd
    steps run without gradient, then the centroids are the normalised means of their final
    members *with* gradient to `x`. Returns (centroids (B, k, D), assignment (B, N), used
    (B, k): the cluster has a member)."""
    with torch.no_grad():
        xd = x.detach().float()
        centres = xd[:, :k].clone()
        for _ in range(iters):
            assign = torch.einsum("bnd,bkd->bnk", xd, centres).argmax(2)
            onehot = F.one_hot(assign, centres.shape[1]).float() * valid[..., None]
            sums = onehot.transpose(1, 2) @ xd
            filled = onehot.sum(1)[..., None] > 0
            centres = torch.where(filled, F.normalize(sums, dim=2), centres)
        assign = torch.einsum("bnd,bkd->bnk", xd, centres).argmax(2)
        onehot = F.one_hot(assign, centres.shape[1]).float() * valid[..., None]
    sums = onehot.to(x.dtype).transpose(1, 2) @ x
    return F.normalize(sums, dim=2), assign, onehot.sum(1) > 0


def prototypes(z: torch.Tensor, cams: torch.Tensor, top: int, group=None):
    """Class prototypes over the global batch: the normalised mean feature of each class's
    `top` most activated pixels in every image where it is present (its CAM is not all zero),
    summed over ranks with gradient (in `group`: a process group of its own, since the sum's
    backward runs beside DDP's). Returns (protos (K, D), has (K,) bool)."""
    flat = cams.flatten(2)  # (B, K, HW)
    picked = torch.zeros_like(flat)
    picked.scatter_(2, flat.topk(min(top, flat.shape[2]), dim=2).indices, 1.0)
    picked = picked * (flat.amax(2, keepdim=True) > 0)  # only where the class is present
    feats = z.flatten(2).transpose(1, 2)  # (B, HW, D)
    sums = torch.einsum("bkn,bnd->kd", picked.to(feats.dtype), feats)
    counts = picked.sum((0, 2))
    if dist.world_size() > 1:
        sums = dist.differentiable_sum(sums, group)
        counts = dist.all_reduce_sum(counts.clone())
    return F.normalize(sums, dim=1), counts > 0


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             t: float) -> torch.Tensor:  # fmt: skip
    """Summed InfoNCE of (A, D) anchors against their (A, D) positives and the (M, D) (shared)
    or (A, M, D) (per anchor) negatives, all normalised."""
    pos = (anchors * positives).sum(1, keepdim=True)
    if negatives.dim() == 2:
        neg = anchors @ negatives.T
    else:
        neg = torch.einsum("ad,amd->am", anchors, negatives)
    logits = torch.cat([pos, neg], 1).float() / t
    return -(logits.log_softmax(1)[:, 0]).sum()


def nroi_loss(anchors, classes, protos, nrois, t: float) -> torch.Tensor:
    """Pixel-to-NROI contrast, summed over anchors: each uncertain foreground pixel (A, D) is
    pulled to its class prototype and pushed from the background regions `nrois` (M, D)."""
    if not len(anchors) or not len(nrois):
        return anchors.sum() * 0.0
    return info_nce(anchors, rows(protos, classes - 1), nrois, t)


def intra_loss(anchors, classes, protos, has, pool, pool_classes, count: int, t: float,
               gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Intra-foreground contrast with active sampling, summed over anchors: each anchor of
    class c is pulled to c's prototype and pushed from `count` pixels of other classes drawn
    from `pool` (P, D) (labels `pool_classes` (P,), 1..K): a class j with probability
    softmax_j(sim(proto_c, proto_j) / t) (the classes most like c most often), then a pixel
    of j uniformly. Classes without another class in the pool contribute nothing."""
    total = anchors.sum() * 0.0
    if not len(anchors) or not len(pool):
        return total
    sim = (protos @ protos.T).detach().float() / t  # (K, K)
    for c in classes.unique().tolist():
        others = pool_classes != c
        if not others.any():
            continue
        present = torch.zeros(len(protos), dtype=torch.bool, device=pool.device)
        present[pool_classes[others] - 1] = True
        present &= has
        if not present.any():
            continue
        choose = sim[c - 1].masked_fill(~present, -torch.inf).softmax(0)
        per_class = torch.bincount(pool_classes - 1, minlength=len(protos)).clamp_min(1)
        weights = torch.where(others, choose[pool_classes - 1] / per_class[pool_classes - 1], 0.0)
        drawn = torch.multinomial(weights.cpu(), count, replacement=True, generator=gen)
        mine = classes == c
        negatives = rows(pool, drawn.to(pool.device))
        total = total + info_nce(anchors[mine], protos[c - 1].expand_as(anchors[mine]),
                                 negatives, t)  # fmt: skip
    return total
