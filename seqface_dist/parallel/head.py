"""The partitioned SeqFace head: classifier W and DSA centers split by rows over ranks.

    comm = Comm()                                   # the world group, or Comm(group)
    head = PartitionedHead(HeadSpec(num_identities=N_id, num_sequences=N_seq, dim=512),
                           loss_cfg, comm)
    opt = head.make_optimizer(lr=0.1, weight_decay=5e-4)
    out = head(local_features, local_center_index, step=step)
    (out.loss).backward()          # or engine.backward(out.loss) beside a DeepSpeed backbone
    opt.step(); opt.zero_grad(set_to_none=True)

Rank r owns rows ``layout.local_rows(r)`` of W (identities) and of the centers (its
identity rows, then its sequence rows). Per step each rank sends O(B·D) for the
features plus O(B) scalars, whatever N_id and N_seq are. Keep the head *out* of any
data-parallel wrapper: DeepSpeed/DDP would broadcast and average the row blocks.
The output loss is the global batch's loss, equal on every rank.

Sampled softmax (``loss.sampled_softmax_fraction`` f < 1, Partial FC's idea): per step each
rank takes the rows of its W block that are targets of the global batch ("positives") plus
rows drawn uniformly from the rest, ceil(f * n_local) in all, seeded by (seed, rank, step).
The softmax of every sample runs over the union S of all ranks' sampled rows, with the
margin on its target as before; W's gradient lives on the sampled rows and the optimizer
updates only them (InPlaceSGD ``lazy_rows``). Like Partial FC, the partition function is
not corrected for the rows left out: lse over S is the estimate of lse over all rows.
LSR's uniform target (``lsr``) is taken over the sampled identity rows S_id (all ranks):
l_i = lse_{c in S} z_ic - (1/|S_id|) sum_{c in S_id} z_ic, gradient p^S_ic - 1/|S_id| on
S_id. With uniform draws the mean over S_id is an unbiased estimate of the mean over all
N_id logits up to the batch's own positives (always kept, a share of ~B/|S_id|), so the
term keeps its meaning, "no identity preferred", over what the sample sees.

A bf16 head (``dtype=torch.bfloat16``, ``train.head_precision: bf16``) stores W, the centers
and their momentum in bf16 and computes everything else in fp32 (see chief.py, optim.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from seqface_dist.config import CLASS_ROW_MODES, LossConfig
from seqface_dist.losses import lambda_schedule, sample_negatives, sample_rows

from .chief import BlockMarginSoftmax, MarginSpec, Workspace
from .comm import Comm, gather_rows
from .dsa import BlockDSA
from .optim import InPlaceSGD
from .partition import HeadLayout

_INIT_CHUNK = 4096  # rows per independently seeded init chunk: init is the same for any R


@dataclass(frozen=True)
class HeadSpec:
    num_identities: int
    num_sequences: int
    dim: int = 512
    seed: int = 0  # initialisation of W and the per-step negative draws
    weight_init_std: float = 0.01

    def __post_init__(self) -> None:
        if self.num_identities < 1:
            raise ValueError(f"HeadSpec.num_identities must be >= 1, got {self.num_identities}")
        if self.num_sequences < 0:
            raise ValueError(f"HeadSpec.num_sequences must be >= 0, got {self.num_sequences}")
        if self.dim < 1:
            raise ValueError(f"HeadSpec.dim must be >= 1, got {self.dim}")


class SoftmaxBlock(NamedTuple):
    """The W rows a step's softmax runs over on this rank."""

    rows: torch.Tensor | None  # sorted local rows (sampled softmax), or None: all of them
    n_id_cols: int  # identity rows among them (they come first)
    num_identities: int  # identity rows of every rank: LSR's uniform target runs over them


@dataclass
class HeadOutput:
    """The global batch's loss terms (equal on every rank). Only ``loss`` has gradients."""

    loss: torch.Tensor  # chief_weight * chief + dsa_weight * dsa
    chief: torch.Tensor  # mean chief loss over the samples that count in the mode
    chief_identity: torch.Tensor  # its mean over identity samples (margin softmax)
    chief_lsr: torch.Tensor  # its mean over sequence samples (LSR or their own rows)
    dsa: torch.Tensor  # mean DSA loss
    dsa_pull: torch.Tensor  # mean of lam * d_pos
    dsa_push: torch.Tensor  # mean of the hinge part
    active_fraction: torch.Tensor  # active hinge terms / counted hinge terms
    num_negatives: int  # |S| of this step, over all ranks
    lam: float  # A-Softmax lambda of this step


def _normal_draw(std: float):
    return lambda shape, g: torch.randn(shape, generator=g, dtype=torch.float64) * std


def _uniform_draw(bound: float):
    return lambda shape, g: (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound


def _chunked_init_(block: torch.Tensor, row0: int, draw, seed: int) -> None:
    """Fill rows [row0, row0 + len) of a virtual global matrix, identically for any R."""
    n, d = block.shape
    if n == 0:
        return
    first, last = row0 // _INIT_CHUNK, (row0 + n - 1) // _INIT_CHUNK
    for c in range(first, last + 1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        chunk = draw((_INIT_CHUNK, d), g)
        lo, hi = max(row0, c * _INIT_CHUNK), min(row0 + n, (c + 1) * _INIT_CHUNK)
        block[lo - row0:hi - row0].copy_(chunk[lo - c * _INIT_CHUNK:hi - c * _INIT_CHUNK])


class PartitionedHead(nn.Module):
    def __init__(self, spec: HeadSpec, loss: LossConfig | None = None, comm: Comm | None = None,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 feature_grad_scale: float = 1.0, sequence_weight: float | None = None) -> None:
        super().__init__()
        self.spec, self.cfg = spec, loss or LossConfig()
        # loss.sequence_weight < 0 (auto) is resolved from the data by whoever knows it
        # (train.step.resolve_sequence_weight); without that knowledge: 1, the paper's.
        w = self.cfg.sequence_weight if sequence_weight is None else sequence_weight
        self.sequence_weight = 1.0 if w < 0 else float(w)
        self.comm = comm or Comm()
        self.cfg.validate("loss")  # the config refuses what the head cannot do, by key
        self.mode = self.cfg.sequence_mode
        self.sequence_rows = self.mode in CLASS_ROW_MODES  # W gains one row per sequence
        self.layout = HeadLayout(spec.num_identities, spec.num_sequences, self.comm.world_size)
        self.rank = self.comm.rank
        self._check_ranks_agree(dtype)
        # A bf16 head (W and centers in bf16: half the memory) computes its features, norms,
        # softmax statistics and DSA distances in fp32; only its GEMMs run in bf16.
        self.compute_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        self.margin = MarginSpec(self.cfg.margin, self.cfg.m, self.cfg.scale,
                                 self.cfg.arcface_margin, self.cfg.cosface_margin,
                                 self.cfg.reference_margin_grad)
        self.feature_grad_scale = feature_grad_scale
        self.workspace = Workspace()

        id0, id1, sq0, sq1 = self.layout.local_rows(self.rank)
        self.id_rows, self.seq_rows = (id0, id1), (sq0, sq1)
        n_id_local, n_seq_local = id1 - id0, sq1 - sq0
        # Local W block: this rank's identity rows, then (modes with sequence rows) its
        # sequence rows, stacked like the center block; rows of a virtual N_id + N_seq
        # matrix, so the init is the same for any R.
        weight = torch.empty(n_id_local + (n_seq_local if self.sequence_rows else 0),
                             spec.dim, dtype=dtype, device=device)
        normal = _normal_draw(spec.weight_init_std)
        _chunked_init_(weight[:n_id_local], id0, normal, spec.seed)
        _chunked_init_(weight[n_id_local:], spec.num_identities + sq0, normal, spec.seed)
        self.weight = nn.Parameter(weight)
        # Local center block: this rank's identity centers, then its sequence centers.
        centers = torch.zeros(n_id_local + n_seq_local, spec.dim, dtype=dtype, device=device)
        if self.cfg.center_init == "xavier":  # Caffe's xavier filler: U(-a, a), a = sqrt(3/D)
            xavier = _uniform_draw((3.0 / spec.dim) ** 0.5)
            seed = spec.seed + 7_919  # not W's draws
            _chunked_init_(centers[:n_id_local], id0, xavier, seed)
            _chunked_init_(centers[n_id_local:], spec.num_identities + sq0, xavier, seed)
        self.centers = nn.Parameter(centers)
        # Gradient accumulation (train.gradient_accumulation_steps > 1; see
        # collect_center_update): the center update summed over a step's micro-batches.
        self.accumulating = False
        self._own_rows: torch.Tensor | None = None  # last forward's owned center rows
        self._center_acc: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # -- construction checks ------------------------------------------------------------

    def _check_ranks_agree(self, dtype: torch.dtype) -> None:
        """Fail on every rank at construction if ranks disagree (never a later hang)."""
        s = self.spec
        mine = torch.tensor([s.num_identities, s.num_sequences, s.dim, s.seed,
                             {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}.get(dtype, 3)],
                            dtype=torch.long)
        allv = self.comm.all_gather(mine[None]).view(self.comm.world_size, -1)
        names = ("num_identities", "num_sequences", "dim", "seed", "dtype")
        for j, name in enumerate(names):
            col = allv[:, j]
            if not bool((col == col[0]).all()):
                raise ValueError(f"PartitionedHead: ranks disagree on {name}: "
                                 f"{dict(enumerate(col.tolist()))} (rank: value)")

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.layout.world_size}, identity rows={self.id_rows}, "
                f"sequence rows={self.seq_rows}, dim={self.spec.dim}")

    # -- the step ------------------------------------------------------------------------

    def _gather_index(self, center_index: torch.Tensor) -> torch.Tensor:
        """All ranks' center indices, validated identically everywhere (so all raise)."""
        b = torch.tensor([center_index.numel()], dtype=torch.long, device=center_index.device)
        sizes = self.comm.all_gather(b)
        if not bool((sizes == sizes[0]).all()):
            raise ValueError(f"PartitionedHead: local batch sizes differ across ranks: "
                             f"{sizes.tolist()}; every rank must feed the same batch size")
        t = self.comm.all_gather(center_index.long().reshape(-1))
        upper = self.layout.num_centers
        bad = ((t < 0) | (t >= upper)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            n = int(sizes[0])
            raise ValueError(
                f"PartitionedHead: center index {int(t[i])} of sample {i % n} on rank {i // n} "
                f"is outside [0, {upper}) (identities 0..{self.spec.num_identities - 1}, "
                f"sequences {self.spec.num_identities}..{upper - 1})")
        return t

    def draw_negatives(self, step: int) -> torch.Tensor:
        """This rank's negatives for ``step``: local center rows, seeded by (seed, rank, step)."""
        g = torch.Generator(device=self.centers.device)
        g.manual_seed((self.spec.seed * 1_000_003 + step) * 65_537 + self.rank)
        return sample_negatives(self.centers.shape[0], self.cfg.dsa_p, generator=g,
                                mode=self.cfg.dsa_sampler)

    def softmax_rows_per_step(self) -> int:
        """Rows of this rank's W block a step's softmax runs over (the sampled ones, at
        least; more only when the batch's positives here outnumber them)."""
        n = self.weight.shape[0]
        return n if self.cfg.sampled_softmax_fraction >= 1.0 else math.ceil(
            self.cfg.sampled_softmax_fraction * n)

    def draw_classifier_rows(self, positives: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's sampled rows of W for ``step`` (sampled softmax): ``positives`` plus
        uniform negatives up to ceil(fraction * local rows), seeded by (seed, rank, step)."""
        g = torch.Generator(device=self.weight.device)
        g.manual_seed(((self.spec.seed * 1_000_003 + step) * 65_537 + self.rank) * 2 + 1)
        return sample_rows(self.weight.shape[0], positives, self.softmax_rows_per_step(),
                           generator=g)

    def local_rows_of(self, center_index: torch.Tensor) -> torch.Tensor:
        """Global center indices -> rows of the local center block (-1 if not owned here)."""
        return self.layout.local_center_row(center_index, self.rank)

    def global_index_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the local center block -> global center indices."""
        (id0, id1), (sq0, _) = self.id_rows, self.seq_rows
        n_local_id = id1 - id0
        return torch.where(rows < n_local_id, rows + id0,
                           self.spec.num_identities + sq0 + rows - n_local_id)

    def forward(self, features: torch.Tensor, center_index: torch.Tensor, *, step: int = 0,
                negatives: torch.Tensor | None = None,
                classifier_rows: torch.Tensor | None = None) -> HeadOutput:
        """Loss terms of the global batch from this rank's ``features`` (b x D) and indices.

        ``negatives`` (global center indices) replaces the per-rank draw — each rank then
        uses those in its block (tests and reference checks use it). ``classifier_rows``
        (global rows of W: identity y, sequence row N_id + q) likewise replaces the sampled
        softmax's draw; the batch's positive rows are added to it.
        """
        if features.dim() != 2 or features.shape[1] != self.spec.dim:
            raise ValueError(f"PartitionedHead: features must be (batch, {self.spec.dim}), "
                             f"got {tuple(features.shape)}")
        cfg, n_id = self.cfg, self.spec.num_identities
        t = self._gather_index(center_index.to(features.device))
        feats = gather_rows(features.to(self.compute_dtype), self.comm, self.feature_grad_scale)
        is_seq = t >= n_id

        lam = lambda_schedule(step, base=cfg.lambda_base, gamma=cfg.lambda_gamma,
                              power=cfg.lambda_power, lambda_min=cfg.lambda_min)
        if cfg.weight_renorm:  # the reference's margin layer normalises W in place
            with torch.no_grad():
                self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(
                    torch.finfo(self.weight.dtype).tiny))
        tiny = torch.finfo(feats.dtype).tiny
        fn = feats / feats.norm(dim=1, keepdim=True).clamp_min(tiny)
        chief_i, counts = self._chief(fn, t, is_seq, lam, step, classifier_rows)

        # DSA: pull by the owner of each center, pushes from this rank's negatives.
        if negatives is None:
            neg_rows = self.draw_negatives(step)
        else:
            neg_rows = self.local_rows_of(negatives.to(t.device).long())
            neg_rows = neg_rows[neg_rows >= 0]
        neg_index = self.global_index_of_rows(neg_rows)
        if self.accumulating:
            own = self.local_rows_of(t)
            self._own_rows = own[own >= 0]
        dsa_i, pull_i, push_i, stats = BlockDSA.apply(
            feats, self.centers, t, self.local_rows_of(t), is_seq, neg_rows, neg_index,
            neg_index >= n_id, self.comm, cfg.dsa_lambda, cfg.dsa_alpha, cfg.dsa_beta)

        n_counted = int(counts.sum())
        chief = chief_i.sum() / n_counted if n_counted else fn.sum() * 0.0
        dsa = dsa_i.mean()
        with torch.no_grad():
            c = chief_i.detach()
            nan = torch.tensor(float("nan"), dtype=c.dtype, device=c.device)
            chief_identity = c[~is_seq].mean() if bool((~is_seq).any()) else nan
            seq_counted = is_seq & counts
            chief_lsr = c[seq_counted].mean() if bool(seq_counted.any()) else nan
            active_fraction = stats[0] / stats[1].clamp_min(1.0)
        return HeadOutput(
            loss=cfg.chief_weight * chief + cfg.dsa_weight * dsa,
            chief=chief.detach(), chief_identity=chief_identity, chief_lsr=chief_lsr,
            dsa=dsa.detach(), dsa_pull=pull_i.mean(), dsa_push=push_i.mean(),
            active_fraction=active_fraction, num_negatives=int(stats[2]), lam=lam)

    def _chief(self, fn: torch.Tensor, t: torch.Tensor, is_seq: torch.Tensor, lam: float,
               step: int, classifier_rows: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample chief loss (B,) in this head's sequence mode, and which samples count.

        Sample i's target column here: its identity row, or in the modes with sequence
        rows its sequence row (local W rows stack identity rows, then sequence rows, like
        the center block), where this rank owns it; else -1.
        """
        mode = self.mode
        id0, id1 = self.id_rows
        if self.sequence_rows:
            target_col = self.local_rows_of(t)
            classify = torch.ones_like(is_seq)
        else:
            target_col = torch.where(~is_seq & (t >= id0) & (t < id1), t - id0,
                                     torch.full_like(t, -1))
            classify = ~is_seq
        none = torch.zeros_like(is_seq)
        uniform = is_seq if mode == "lsr" else none
        hide_id = is_seq if mode == "separate_heads" else none
        hide_seq = {"separate_heads": ~is_seq, "masked_softmax": is_seq}.get(mode, none)
        counts = classify | uniform
        keep = classify.nonzero().squeeze(1) if mode == "none" else None
        block = self._sampled_block(target_col if keep is None else target_col[keep], step,
                                    classifier_rows, bool(uniform.any()))
        if keep is not None:  # none: sequence samples skip the softmax altogether
            per = torch.zeros(t.shape[0], dtype=fn.dtype, device=fn.device)
            if keep.numel():
                per = per.index_put((keep,), self._block(
                    fn[keep], target_col[keep], none[keep], none[keep], none[keep], lam,
                    block))
            return per, counts
        per = self._block(fn, target_col, uniform, hide_id, hide_seq, lam, block)
        if self.sequence_weight != 1.0:
            w = torch.full_like(per, self.sequence_weight)  # in per's dtype (float64 exact)
            per = per * torch.where(is_seq, w, torch.ones_like(per))
        return per, counts

    def _sampled_block(self, target_col: torch.Tensor, step: int,
                       classifier_rows: torch.Tensor | None, lsr: bool) -> SoftmaxBlock:
        """All local rows of W, or (sampled softmax) the sorted local rows drawn for this
        step, the batch's positives always among them."""
        n_id_cols = self.id_rows[1] - self.id_rows[0]
        if classifier_rows is None and self.cfg.sampled_softmax_fraction >= 1.0:
            return SoftmaxBlock(None, n_id_cols, self.spec.num_identities)
        positives = target_col[target_col >= 0]
        if classifier_rows is None:
            rows = self.draw_classifier_rows(positives, step)
        else:
            given = self.local_rows_of(classifier_rows.to(target_col.device).long())
            given = given[(given >= 0) & (given < self.weight.shape[0])]
            rows = torch.unique(torch.cat([positives, given]))
        n_id_sampled = int((rows < n_id_cols).sum())
        num_identities = n_id_sampled
        if lsr:  # LSR's uniform target runs over the sampled identity rows of every rank
            total = torch.tensor([n_id_sampled], dtype=torch.long, device=rows.device)
            num_identities = int(self.comm.all_reduce_(total))
        return SoftmaxBlock(rows, n_id_sampled, num_identities)

    def _block(self, fn, target_col, uniform, hide_id, hide_seq, lam, block: SoftmaxBlock):
        if block.rows is not None:  # local W row -> column of the sampled block
            target_col = torch.where(target_col >= 0,
                                     torch.searchsorted(block.rows, target_col.clamp_min(0)),
                                     target_col)
        return BlockMarginSoftmax.apply(fn.to(self.weight.dtype), self.weight, target_col,
                                        uniform, hide_id, hide_seq, self.comm, self.margin,
                                        lam, block.num_identities, block.n_id_cols,
                                        self.workspace, block.rows)

    # -- optimisation ----------------------------------------------------------------------

    def grad_sq_norm(self) -> torch.Tensor:
        """Squared norm of the classifier's gradient over every rank's block (a collective).

        The centers' update is not a gradient and is not counted (nor clipped).
        """
        g = self.weight.grad
        if g is not None and g.is_sparse:  # sampled softmax: the sampled rows' gradient
            g = g.coalesce().values()
        sq = (g.float().square().sum() if g is not None else
              torch.zeros((), device=self.weight.device))
        return self.comm.all_reduce_(sq.reshape(1)).squeeze(0)

    def scale_grad_(self, coef: float) -> None:
        """Multiply the classifier's gradient by ``coef`` (gradient clipping)."""
        g = self.weight.grad
        if g is not None:
            (g.coalesce().values() if g.is_sparse else g).mul_(coef)

    # -- gradient accumulation ------------------------------------------------------------
    #
    # W's gradient is a true gradient: micro-batch losses scaled by 1/k sum to the large
    # batch's mean gradient through autograd alone. The centers' update is not: each
    # micro-batch's is -(1/(1 + count_n)) sum (f_i - c_n) / 2 with *its own* count, and
    # a sum of those is not the large batch's. With ``accumulating`` set, the Trainer calls
    # collect_center_update() after each micro-batch's backward (it keeps the raw sums
    # -sum (f_i - c_n) / 2 and the counts) and finish_accumulation() at the step's end: the
    # centers then move once, by the update the whole step's batch gives (the centers do
    # not move between micro-batches, so the raw sums add up exactly).

    def collect_center_update(self) -> None:
        """Move the last micro-batch's center update out of ``centers.grad`` as raw sums."""
        g, rows = self.centers.grad, self._own_rows
        self._own_rows = None
        if g is None:
            return
        self.centers.grad = None
        g = g.coalesce()
        idx, vals = g.indices()[0], g.values()
        if rows is None or not idx.numel():
            return
        uniq, count = torch.unique(rows, return_counts=True)
        pos = torch.searchsorted(uniq, idx)
        raw = vals.to(torch.float32 if vals.dtype == torch.bfloat16 else vals.dtype)
        raw = raw * (1.0 + count[pos].to(raw.dtype))[:, None]
        self._center_acc.append((idx, raw, rows))

    def finish_accumulation(self) -> None:
        """The step's center update into ``centers.grad`` (normalised by the step's
        counts); W's accumulated sparse gradient coalesced."""
        g = self.weight.grad
        if g is not None and g.is_sparse and not g.is_coalesced():
            self.weight.grad = g.coalesce()
        acc, self._center_acc = self._center_acc, []
        if not acc:
            return
        idx = torch.cat([a[0] for a in acc])
        raw = torch.cat([a[1] for a in acc])
        total = torch.sparse_coo_tensor(idx[None], raw, (self.centers.shape[0], raw.shape[1]),
                                        check_invariants=False).coalesce()
        uniq, count = torch.unique(torch.cat([a[2] for a in acc]), return_counts=True)
        rows, vals = total.indices()[0], total.values()
        vals = vals / (1.0 + count[torch.searchsorted(uniq, rows)].to(vals.dtype))[:, None]
        self.centers.grad = torch.sparse_coo_tensor(
            rows[None], vals.to(self.centers.dtype), self.centers.shape, is_coalesced=True,
            check_invariants=False)

    def discard_accumulation(self) -> None:
        """Drop a skipped step's collected center updates."""
        self._center_acc, self._own_rows = [], None

    def make_optimizer(self, lr: float, momentum: float = 0.9,
                       weight_decay: float = 5e-4) -> InPlaceSGD:
        """W with weight decay; centers without, at the center lr (default: the same lr)."""
        center_lr = lr if self.cfg.center_lr < 0 else self.cfg.center_lr
        return InPlaceSGD([
            {"params": [self.weight], "lr": lr, "momentum": momentum,
             "stochastic_rounding": True,  # bf16 W: see InPlaceSGD
             "weight_decay": weight_decay, "name": "weight",
             "lazy_rows": True},  # a sparse W gradient: the sampled softmax's rows
            {"params": [self.centers], "lr": center_lr, "momentum": self.cfg.center_momentum,
             "lazy_rows": self.cfg.lazy_center_momentum,
             "weight_decay": 0.0, "name": "centers"},
        ], lr=lr, seed=self.spec.seed * 65_537 + self.rank)
