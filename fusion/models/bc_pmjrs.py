"""BC-PMJRS (Qin, Liu, Zong, Neural Networks 2025), our reconstruction (reference/methods.md section 2.6).

Only the abstract is public and the released code cannot run (below), so every choice here is ours:

1. Per modality m: x_m (B, T_m, D_m) -> ``SequenceEncoder`` -> local tokens (B, T_m, H).
2. Global tokens: ``AttentionPool`` with G learned queries per modality -> (B, G, H), computed per sample.
3. Global-local interaction: the local tokens of m cross-attend (``CrossModalBlock``) to the G global tokens of
   every OTHER modality the same sample has, (B, G * (M - 1), H). Cost O(T G H) instead of MulT's O(T_i T_j H).
4. z_m = masked mean over time (B, H); p_m = Linear_m(z_m) projects into the joint space (our reading of the
   "predefined joint representation space": a plain linear projection).
5. Importance fusion: a per-modality MLP scores p_m; a softmax over the modalities each sample HAS gives the
   weights; z_joint = sum_m w_m p_m (B, H). ``fusion="mean"`` averages the present p_m instead.
6. Head: residual MLP, out = Linear(z_joint + MLP(z_joint)) -> (B,) regression, (B, C) / (B, K) logits.

Losses (named; their sum is the objective; the lambdas are buffers, see LTP/LTD below):

- ``task``: L1 (regression), cross-entropy (classification) or binary cross-entropy (multilabel);
- ``mi_min`` = lambda_min * mean over modality pairs (i, j) of the CLUB upper bound on I(u_i; u_j), where
  u_m = masked mean over time of the ENCODER output (B, H), before any cross-modal mixing (a pair with fewer
  than 2 samples having both is skipped). Scoring z_m instead, after the global-local step, would penalise the
  information the model itself copies across modalities: there a re-fitted CLUB(text; audio) is about 100 nats
  at initialisation although text and audio are independent in the synthetic task. q is called frozen
  (``frozen_call``), so this term trains only the encoders, never q;
- ``club_fit`` = sum over pairs of CLUB's negative log-likelihood of q(u_j | u_i) with u detached: it trains only
  the q networks, which sit in their own parameter group ``club`` (learning rate ``club_lr_scale`` * lr). One
  backward of the sum therefore gives each group its own gradient. Clip each group on its own
  (``train.trainer``), or q's likelihood gradient (norm in the hundreds) sets the clip factor of the whole model.
  The bound holds only while q keeps up with the encoders; ``club_lag`` measures how far it falls behind;
- ``mi_max`` = lambda_max * InfoNCE loss between z_joint and a label embedding e(y) (MLP on the scalar label,
  ``nn.Embedding`` for classes, Linear on the multi-hot vector), the other samples of the batch as negatives.

Ablation switches, one term each: ``mi_min=False`` (or lambda_min = 0) adds neither ``mi_min`` nor ``club_fit``;
``mi_max=False`` (or lambda_max = 0) adds no ``mi_max``; ``ltp_ltd=False`` keeps both weights at their initial
values (``end_epoch`` does nothing). Every switch builds the same modules in the same order (the q networks, the
label embedding and its critic included), so from one seed the full model and each ablation start with identical
weights; a switched-off term's modules are frozen (``requires_grad`` False) and stay out of the optimiser.

Mechanism, measured at every evaluation: ``mi/<a>-<b>`` (the running CLUB estimate), ``mi_max/infonce`` and the
gradient shares of ``mi_min`` and ``mi_max`` (``FusionModel.mechanism``; ``club_fit`` is left out, it trains q
only). On the claims benchmark's redundancy task (seeds 0-9) MI-min carries 0.54 ± 0.09 of the gradient and
MI-max 0.16 ± 0.08: both terms drive the encoders, though neither lowers the MAE there. The reported redundancy
is not CLUB (a re-fitted q reads tens of nats where the true MI is about 1.5): the claims benchmark scores u_text
and u_audio with ``fusion.estimators.measure`` (a linear-Gaussian estimate and a held-out InfoNCE bound).

LTP/LTD (methods.md 2.6 option B): ``end_epoch(val_metrics)`` reads ``val_metrics["task_loss"]`` (the mean
validation task loss). If it improved on the best so far (LTP; the first epoch always does) lambda_max *= 1 + eta
and lambda_min *= 1 - eta, otherwise (LTD) the reverse; both are clipped to ``weight_bounds``; after
``reset_after`` consecutive moves in one direction both return to their initial values. A weight configured as 0
stays 0, and so does a switched-off term's. The weights, best loss and streak are buffers, so checkpoints carry
them.

Defects of the released code (methods.md 2.5) this reconstruction fixes: (1) the optimiser wrapper crashes at the
first step -> plain parameter groups, the rule acts on loss weights; (2) MI_min is a clamped -BCE, identically 0
with no gradient -> a CLUB upper bound with its own fitting loss; (3) MI_max is hard-coded to 0 -> InfoNCE with
the label; (4) the modality-weight LTP/LTD rescales all weights equally (a no-op) -> it moves lambda_min and
lambda_max in opposite directions; (5) the global-local step softmaxes over the BATCH axis, so a prediction
depends on the other samples -> attention is per sample; (6) half of each modality vector is thrown away -> none
is; (7) no missing-modality handling -> masks everywhere, absent modalities leave attention, fusion and MI terms.
Our deviations beyond the released code: MI-min scores the unimodal encoder outputs (the released critics score
the modality vectors after all cross-modal layers) with a CLUB bound whose q is fitted in its own parameter group;
MI-max is InfoNCE with a label embedding; and we drop the full MulT cross-modal stack the released model runs
after the global-local step, so the global-local interaction really is the cheap path.

``faithful=True`` restores only defect 5: every token attends to the global tokens of every sample in the batch
(the released ``[T, B, B]`` score pattern), so predictions depend on batch composition. Defects 1-4 would disable
the method altogether and are not reproducible in a meaningful way; the rest of the model is unchanged.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fusion.base import FusionConfig, FusionModel, FusionOutput, Inputs
from fusion.estimators import CLUB, InfoNCE
from fusion.estimators.club import club_estimate, club_lag, refit_club
from fusion.estimators.critics import full_precision
from fusion.layers import (
    AttentionPool,
    CrossModalBlock,
    OutputLinear,
    SequenceEncoder,
    frozen_call,
    masked_mean,
    task_loss,
)

VAL_LOSS_KEY = "task_loss"  # the validation metric end_epoch reads
FUSIONS = ("importance", "mean")


class MissingMetricError(KeyError):
    """``end_epoch`` was given validation metrics without the key the LTP/LTD rule reads."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class BCPMJRSConfig(FusionConfig):
    num_global: int = 2  # G: global tokens per modality (attention pooling, per sample)
    lambda_min: float = 0.1  # initial weight of the CLUB MI-min term (0 = off; the rule keeps it 0)
    lambda_max: float = 0.1  # initial weight of the InfoNCE MI-max term (0 = off; the rule keeps it 0)
    ltp_eta: float = 0.1  # LTP/LTD step: a weight moves by a factor (1 +- eta) per epoch (0 = fixed weights)
    weight_bounds: tuple[float, float] = (0.01, 1.0)  # the rule clips both weights to [low, high]
    reset_after: int = 10  # consecutive same-direction moves after which both weights return to their initial values
    club_hidden: int = 64  # hidden width of each CLUB q network (mean and log-variance MLPs)
    # q's learning rate (group "club") is this times the model's. On the synthetic task q keeps up at 1 (running and
    # re-fitted CLUB within ~2 nats); 10 and 30 left gaps of ~5 and ~20 nats (seed 0: a noisier q, which the
    # encoders exploit).
    club_lr_scale: float = 1.0
    mi_min: bool = True  # ablation switch: False drops the CLUB MI-min term and its q networks (as lambda_min=0)
    mi_max: bool = True  # ablation switch: False drops the InfoNCE MI-max term and its networks (as lambda_max=0)
    ltp_ltd: bool = True  # ablation switch: False keeps lambda_min and lambda_max fixed (end_epoch does nothing)
    label_embed: int = 32  # width of the label embedding e(y) the InfoNCE term pairs with z_joint
    fusion: str = "importance"  # importance (softmax weights over present modalities) | mean (over present ones)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.num_global < 1:
            out.append(f"num_global: must be >= 1, got {self.num_global}")
        bounds = tuple(self.weight_bounds) if isinstance(self.weight_bounds, (list, tuple)) else ()
        if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1]:
            out.append(f"weight_bounds: must be (low, high) with 0 <= low <= high, got {self.weight_bounds!r}")
        for name in ("lambda_min", "lambda_max"):
            value = getattr(self, name)
            if value < 0:
                out.append(f"{name}: must be >= 0, got {value}")
            elif value > 0 and len(bounds) == 2 and not bounds[0] <= value <= bounds[1]:
                out.append(f"{name}: must be 0 (off) or inside weight_bounds {tuple(bounds)}, got {value}")
        if not 0.0 <= self.ltp_eta < 1.0:
            out.append(f"ltp_eta: must be in [0, 1), got {self.ltp_eta}")
        if self.reset_after < 1:
            out.append(f"reset_after: must be >= 1, got {self.reset_after}")
        if self.club_hidden < 1:
            out.append(f"club_hidden: must be >= 1, got {self.club_hidden}")
        if not self.club_lr_scale > 0:
            out.append(f"club_lr_scale: must be > 0, got {self.club_lr_scale}")
        if self.label_embed < 1:
            out.append(f"label_embed: must be >= 1, got {self.label_embed}")
        if self.fusion not in FUSIONS:
            out.append(f"fusion: must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        return out

    @property
    def initial_weights(self) -> tuple[float, float]:
        """(lambda_min, lambda_max) the model starts from: 0 for a term its switch turns off."""
        return (self.lambda_min if self.mi_min else 0.0), (self.lambda_max if self.mi_max else 0.0)


class BCPMJRS(FusionModel):
    Config = BCPMJRSConfig
    mechanism_keys = ("grad_share/mi_min", "grad_share/mi_max", "diag/mi/*", "diag/mi_max/infonce")  # both MI terms
    uses_every_parameter = True  # missing modalities are masked, never skipped (FusionModel)
    critic_fit_losses = ("club_fit",)  # trains q only: not part of the gradient shares

    def __init__(self, config: BCPMJRSConfig) -> None:
        super().__init__(config)
        c, h = config, config.hidden
        multi = len(self.modalities) > 1
        self.encoders = nn.ModuleDict(
            {m: SequenceEncoder(c.dims[m], h, c.num_layers, c.num_heads, c.dropout) for m in self.modalities}
        )
        # A single modality has no other modality to interact with: no global tokens, no importance weights.
        others = self.modalities if multi else ()
        self.global_pools = nn.ModuleDict({m: AttentionPool(h, c.num_global, c.num_heads, c.dropout) for m in others})
        self.cross = nn.ModuleDict({m: CrossModalBlock(h, c.num_heads, c.dropout) for m in others})
        self.joint_proj = nn.ModuleDict({m: nn.Linear(h, h) for m in self.modalities})
        scored = others if c.fusion == "importance" else ()
        self.importance = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(h, max(h // 2, 1)), nn.ReLU(), nn.Linear(max(h // 2, 1), 1)) for m in scored}
        )
        self.head_mlp = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(h, h))
        self.head_out = OutputLinear(h, c.out_dim)
        self.pairs = list(itertools.combinations(self.modalities, 2))
        lambda_min, lambda_max = c.initial_weights
        self.use_mi_min, self.use_mi_max = lambda_min > 0 and bool(self.pairs), lambda_max > 0
        # Built whatever the switches say, so every ablation starts from the same weights; a switched-off term's
        # modules are frozen (no loss trains them, and DDP must not wait for their gradients).
        self.clubs = nn.ModuleDict({f"{a}_{b}": CLUB(h, h, c.club_hidden) for a, b in self.pairs})
        self.label_embedding = label_embedding(c)
        self.infonce = InfoNCE(h, c.label_embed, critic="separable", hidden_dim=h)
        self.clubs.requires_grad_(self.use_mi_min)
        self.label_embedding.requires_grad_(self.use_mi_max)
        self.infonce.requires_grad_(self.use_mi_max)
        self.register_buffer("lambda_min", torch.tensor(float(lambda_min)))
        self.register_buffer("lambda_max", torch.tensor(float(lambda_max)))
        self.register_buffer("best_task_loss", torch.tensor(float("inf")))
        self.register_buffer("ltp_streak", torch.tensor(0, dtype=torch.long))  # +n: n LTP moves in a row; -n: LTD

    def param_groups(self, lr: float) -> list[dict]:
        """``model`` (everything but the q networks) and, with MI-min on, ``club`` (the CLUB q networks, fitted by
        ``club_fit``) at ``club_lr_scale`` * lr."""
        club = {id(p) for p in self.clubs.parameters()}
        model = [p for p in self.parameters() if p.requires_grad and id(p) not in club]
        groups = [{"name": "model", "params": model, "lr": lr}]
        q = [p for p in self.clubs.parameters() if p.requires_grad]
        if q:
            groups.append({"name": "club", "params": q, "lr": lr * self.config.club_lr_scale})
        return groups

    def forward(self, batch: dict[str, Tensor]) -> FusionOutput:
        inputs = self.prepare(batch)
        local = {m: self.encoders[m](inputs.feats[m], inputs.masks[m]) for m in self.modalities}  # (B, T_m, H)
        tokens = self.global_local(local, inputs)
        z = {m: masked_mean(tokens[m], inputs.masks[m]) for m in self.modalities}  # (B, H), 0 when missing
        projected = torch.stack([self.joint_proj[m](z[m]) for m in self.modalities], 1)  # (B, M, H)
        present = torch.stack([inputs.present[m] for m in self.modalities], 1)  # (B, M) bool
        weights = self.fusion_weights(projected, present)  # (B, M), 0 for missing modalities
        z_joint = (weights[..., None] * projected).sum(1)  # (B, H)
        logits = self.head_out(z_joint + self.head_mlp(z_joint))
        prediction = logits.squeeze(-1) if self.config.task == "regression" else logits

        losses: dict[str, Tensor] = {}
        diagnostics: dict[str, Tensor] = {}
        if inputs.label is not None:
            losses["task"] = task_loss(prediction, inputs.label, self.config.task)
            if self.use_mi_min:  # on the unimodal representations, before the global-local step mixes them
                unimodal = {m: masked_mean(local[m], inputs.masks[m]) for m in self.modalities}  # (B, H)
                club_fit, estimate = self.mi_min_terms(unimodal, inputs.present, diagnostics)
                losses["mi_min"] = self.lambda_min * estimate
                losses["club_fit"] = club_fit
            if self.use_mi_max:
                infonce = self.mi_max_estimate(z_joint, inputs.label, present.any(1))
                losses["mi_max"] = self.lambda_max * -infonce
                diagnostics["mi_max/infonce"] = infonce.detach()
        diagnostics["lambda_min"] = self.lambda_min.detach().clone()
        diagnostics["lambda_max"] = self.lambda_max.detach().clone()
        with torch.no_grad():
            for i, m in enumerate(self.modalities):
                has = present[:, i].float()
                diagnostics[f"importance/{m}"] = (weights[:, i] * has).sum() / has.sum().clamp_min(1.0)
        return FusionOutput(prediction, losses, diagnostics)

    def global_local(self, local: dict[str, Tensor], inputs: Inputs) -> dict[str, Tensor]:
        """Local tokens (B, T_m, H) of each modality updated from the other modalities' global tokens."""
        if len(self.modalities) == 1:
            return local
        g = self.config.num_global
        glob = {m: self.global_pools[m](local[m], inputs.masks[m]) for m in self.modalities}  # (B, G, H)
        out = {}
        for m in self.modalities:
            others = [s for s in self.modalities if s != m]
            source = torch.cat([glob[s] for s in others], 1)  # (B, G * (M - 1), H)
            source_mask = torch.cat([inputs.present[s][:, None].expand(-1, g) for s in others], 1)
            if self.config.faithful:  # the released code's cross-sample attention (methods.md 2.5 #5)
                b = source.shape[0]
                source = source.reshape(1, -1, source.shape[-1]).expand(b, -1, -1)
                source_mask = source_mask.reshape(1, -1).expand(b, -1)
            out[m] = self.cross[m](local[m], inputs.masks[m], source, source_mask)
        return out

    def fusion_weights(self, projected: Tensor, present: Tensor) -> Tensor:
        """(B, M) fusion weights summing to 1 over each sample's present modalities (all 0 for a sample with none)."""
        if not len(self.importance):
            has = present.float()
            return has / has.sum(1, keepdim=True).clamp_min(1.0)
        scores = torch.cat([self.importance[m](projected[:, i]) for i, m in enumerate(self.modalities)], 1)
        # float32 with autocast off: the fill must be representable (-1e9 overflows fp16). The most negative
        # finite float, not -inf: a sample with no modality would otherwise softmax to NaN.
        with full_precision(scores.device):
            scores = scores.float().masked_fill(~present, torch.finfo(torch.float32).min)
            return scores.softmax(1) * present

    def mi_min_terms(
        self, z: dict[str, Tensor], present: dict[str, Tensor], diagnostics: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(club_fit, mean CLUB estimate) over the pairs with >= 2 samples having both modalities (0, 0 if none).

        The rows of a pair are weighted, not indexed out, and a pair with fewer samples counts 0: no host
        synchronisation, eager or compiled. Such a pair's ``mi/a-b`` diagnostic is NaN (undefined for the batch;
        evaluation leaves it out of the mean, the training log writes null).
        """
        fits, estimates, counted = [], [], []
        for a, b in self.pairs:
            both = present[a] & present[b]
            enough = both.sum() >= 2
            club, x, y = self.clubs[f"{a}_{b}"], z[a], z[b]
            fit = club.learning_loss(x, y, both)  # detaches x, y: trains q only
            estimate = frozen_call(club, x, y, both).estimate  # q frozen: trains the encoders only
            fits.append(torch.where(enough, fit, 0.0))
            estimates.append(torch.where(enough, estimate, 0.0))
            counted.append(enough)
            diagnostics[f"mi/{a}-{b}"] = torch.where(enough, estimate, math.nan).detach()
        pairs = torch.stack(counted).sum().clamp_min(1)
        return torch.stack(fits).sum(), torch.stack(estimates).sum() / pairs

    @torch.no_grad()
    def unimodal(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """What MI-min scores: u_m (B, H), the masked time mean of each encoder's output, and present_m (B,) bool."""
        inputs = self.prepare(batch)
        u = {
            m: masked_mean(self.encoders[m](inputs.feats[m], inputs.masks[m]), inputs.masks[m]) for m in self.modalities
        }
        return u, inputs.present

    def club_lag(self, fit_batch: dict[str, Tensor], held_out: dict[str, Tensor], **refit: Any) -> dict[str, float]:
        """Re-fit a fresh q per modality pair to the detached u of ``fit_batch`` (``refit`` goes to ``refit_club``)
        and score the pairs of ``held_out`` (both batches from data the model is not trained on, in eval mode).

        Returns ``mi_refit/a-b`` (nats) for each pair with >= 4 fitting and >= 2 held-out samples; with MI-min on
        also ``mi_running/a-b`` (the running q on the same pairs) and ``mi_gap/a-b`` = running - refit, which
        is far from 0 when the running q lags behind the encoders and the logged ``mi/a-b`` means nothing.
        """
        was_training = self.training
        self.eval()
        try:
            (fit_u, fit_has), (eval_u, eval_has) = self.unimodal(fit_batch), self.unimodal(held_out)
        finally:
            self.train(was_training)
        with torch.random.fork_rng(devices=[]):  # a template for the fresh q when MI-min is off
            template = CLUB(self.config.hidden, self.config.hidden, self.config.club_hidden)
        out: dict[str, float] = {}
        for a, b in self.pairs:
            fit_rows, eval_rows = fit_has[a] & fit_has[b], eval_has[a] & eval_has[b]
            if int(fit_rows.sum()) < 4 or int(eval_rows.sum()) < 2:
                continue
            fit = (fit_u[a][fit_rows], fit_u[b][fit_rows])
            held = (eval_u[a][eval_rows], eval_u[b][eval_rows])
            if not self.use_mi_min:  # MI-min off: only a fresh q's reading
                out[f"mi_refit/{a}-{b}"] = club_estimate(refit_club(template, *fit, **refit), *held)
                continue
            lag = club_lag(self.clubs[f"{a}_{b}"], fit, held, **refit)
            pair = f"{a}-{b}"
            out.update({f"mi_refit/{pair}": lag.refit, f"mi_running/{pair}": lag.running, f"mi_gap/{pair}": lag.gap})
        return out

    def mi_max_estimate(self, z_joint: Tensor, label: Tensor, alive: Tensor) -> Tensor:
        """InfoNCE lower bound on I(z_joint; y) in nats over the samples with any modality (0 below 2 samples)."""
        if not self.use_mi_max:
            raise RuntimeError("MI-max is switched off (mi_max=False or lambda_max=0): its label critic is not trained")
        if self.config.task == "regression":
            embedded = self.label_embedding(label.float().reshape(-1, 1))
        elif self.config.task == "classification":
            embedded = self.label_embedding(label.long().reshape(-1))
        else:
            embedded = self.label_embedding(label.float())
        return self.infonce(z_joint, embedded, alive).estimate  # 0 with fewer than 2 alive samples

    @torch.no_grad()
    def end_epoch(self, val_metrics: dict[str, float]) -> dict[str, float]:
        """LTP/LTD step on (lambda_min, lambda_max) from ``val_metrics["task_loss"]``; returns the new values
        (nothing, and reads nothing, with ``ltp_ltd`` off)."""
        c = self.config
        if not c.ltp_ltd:
            return {}
        if VAL_LOSS_KEY not in val_metrics:
            raise MissingMetricError(
                f"BC-PMJRS end_epoch needs val_metrics[{VAL_LOSS_KEY!r}] (the mean validation task loss) for its "
                f"LTP/LTD rule; got keys {sorted(val_metrics)}"
            )
        loss = float(val_metrics[VAL_LOSS_KEY])
        improved = loss < float(self.best_task_loss)  # NaN never improves
        if improved:
            self.best_task_loss.fill_(loss)
        up, down = 1.0 + c.ltp_eta, 1.0 - c.ltp_eta
        initial_min, initial_max = c.initial_weights
        self._move(self.lambda_max, up if improved else down, initial_max)
        self._move(self.lambda_min, down if improved else up, initial_min)
        direction = 1 if improved else -1
        streak = int(self.ltp_streak)
        streak = streak + direction if streak * direction > 0 else direction
        if abs(streak) >= c.reset_after:
            self.lambda_min.fill_(initial_min)
            self.lambda_max.fill_(initial_max)
            streak = 0
        self.ltp_streak.fill_(streak)
        return {
            "lambda_min": float(self.lambda_min),
            "lambda_max": float(self.lambda_max),
            "ltp": float(improved),
            "best_task_loss": float(self.best_task_loss),
        }

    def _move(self, weight: Tensor, factor: float, initial: float) -> None:
        if initial > 0:  # a term configured off stays off
            low, high = self.config.weight_bounds
            weight.fill_(min(max(float(weight) * factor, low), high))


def label_embedding(c: BCPMJRSConfig) -> nn.Module:
    """e(y) for the InfoNCE term: MLP on the scalar label, ``nn.Embedding`` for classes, Linear on multi-hot."""
    if c.task == "regression":
        return nn.Sequential(nn.Linear(1, c.label_embed), nn.ReLU(), nn.Linear(c.label_embed, c.label_embed))
    if c.task == "classification":
        return nn.Embedding(c.num_classes, c.label_embed)
    return nn.Linear(c.num_classes, c.label_embed)
